//! The BPF-LSM secret-file backend: secret opens decided in the kernel (`lsm/file_open`).
//!
//! Where the kernel refuses BPF-LSM (no `bpf` in /sys/kernel/security/lsm, as on the CI
//! host), each test asserts that the daemon fell back to fanotify (status `file_backend`),
//! prints why and returns; the fanotify backend's own tests (file_open.rs, enforce.rs,
//! attacks_files.rs) cover the same cases there. Where it loads (Debian 6.1 and 6.12 under
//! QEMU: this file is in the kernel matrix's guest suite), they prove: EPERM in the kernel
//! for ungranted and expired opens by every way of reaching the file, allowed granted opens,
//! kill, monitor mode, fail-closed judging after SIGKILL of the daemon (expiry and taint
//! included), renamed and replaced secrets, the kernel's device encoding. Few daemons on
//! purpose: each start costs tens of seconds of verifier time under emulation.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use enforcer_tests::enforce_fixture::file_attacks::{
    READ_200, RENAME_AWAY, REPLACE_THEN_READ, rotate_until,
};
use enforcer_tests::enforce_fixture::{Fixture, PRELUDE, py_run};
use enforcer_tests::*;

/// Whether this kernel runs BPF-LSM programs: doctor's probe really loads `lsm/file_open`
/// (`bpf` in the active LSM list is not enough: the CI host lists it and refuses the load).
fn kernel_has_bpf_lsm() -> bool {
    static LOADS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADS.get_or_init(|| {
        let out = enforcer(&["doctor", "--json"]);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("doctor --json: {e}: {}", String::from_utf8_lossy(&out.stderr))
        });
        let probe = doc["probes"].as_array().and_then(|p| {
            p.iter().find(|p| p["name"].as_str().is_some_and(|n| n.starts_with("lsm/file_open")))
        });
        probe.unwrap_or_else(|| panic!("doctor has no lsm/file_open probe: {doc:#}"))["ok"]
            .as_bool()
            .unwrap()
    })
}

/// True when the daemon runs the BPF-LSM backend. Otherwise asserts the fallback is fanotify
/// on a kernel that refuses BPF-LSM, says why, and the test returns.
fn lsm_backend(f: &Fixture, test: &str) -> bool {
    let status = f.daemon.status_json();
    let backend = status["file_backend"].as_str().unwrap_or_default().to_string();
    if kernel_has_bpf_lsm() {
        assert_eq!(backend, "bpf-lsm", "BPF-LSM is active here: {status:#}");
        for prog in ["lsm/file_open", "lsm/inode_free"] {
            assert!(
                status["programs"].as_array().unwrap().iter().any(|p| p == prog),
                "{prog}: {status:#}"
            );
        }
        assert!(status["fail_open"][0].as_str().unwrap().contains("fails closed"), "{status:#}");
        return true;
    }
    assert_eq!(backend, "fanotify", "{status:#}");
    let why = status["backends"]["file_open"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("fanotify"), "{why}");
    eprintln!("SKIP {test}: this kernel refuses BPF-LSM; the fanotify fallback runs ({why})");
    false
}

/// The file_open events of `pid` (waits until there are `n`, up to 10 s).
fn opens_of(f: &Fixture, pid: u32, n: usize) -> Vec<Event> {
    opens_of_within(f, pid, n, Duration::from_secs(10))
}

/// The file_open events of `pid` (waits until there are `n`, up to `limit` scaled).
fn opens_of_within(f: &Fixture, pid: u32, n: usize, limit: Duration) -> Vec<Event> {
    let deadline = Instant::now() + limit * time_scale();
    loop {
        let got: Vec<Event> = f.daemon.events().into_iter().filter(by("file_open", pid)).collect();
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A snippet's output lines, with the pid it printed last split off.
fn with_pid(mut out: Vec<String>) -> (u32, Vec<String>) {
    let pid = out.pop().expect("no output").parse().expect("pid last");
    (pid, out)
}

/// A python process in the test cgroup (under `enforcer run --intent` when given) that
/// prints its pid, then per line on stdin reads the secret (`read`) or connects to a loopback
/// port (`conn PORT`) and answers "ok" or the errno name.
fn reader(f: &Fixture, intent: Option<(&str, &str)>) -> Child {
    let script = format!(
        "{PRELUDE}\nprint(os.getpid(), flush=True)\nfor line in sys.stdin:\n    cmd = line.split()\n    if cmd[0] == 'read': read()\n    else: conn(int(cmd[1]))"
    );
    let mut c = match intent {
        Some((intent, ttl)) => {
            let mut c = f.cg.command(enforcer_bin());
            c.args(["run", "--intent", intent, "--ttl", ttl, "--", &python(), "-u", "-c"]);
            c
        }
        None => {
            let mut c = f.cg.command(python());
            c.args(["-u", "-c"]);
            c
        }
    };
    c.args([&script, &f.secret])
        .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    c.spawn().unwrap()
}

fn line(c: &mut Child) -> String {
    let mut s = String::new();
    BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut s).unwrap();
    s.trim().to_string()
}

fn ask(c: &mut Child) -> String {
    writeln!(c.stdin.as_mut().unwrap(), "read").unwrap();
    line(c)
}

fn conn(c: &mut Child, port: u16) -> String {
    writeln!(c.stdin.as_mut().unwrap(), "conn {port}").unwrap();
    line(c)
}

/// The lsm fixture: enforce mode; secret `key` valid only toward `ok_port`, intent `wide`
/// (deny) covering it toward every loopback port; secret `other` (a path nobody created yet)
/// covered by intent `killer` (kill). Where the kernel runs BPF-LSM, `file_backend =
/// "bpf-lsm"` (which refuses to start without it: the forced choice is tested here, at no
/// extra daemon start); elsewhere the default, whose fanotify fallback `lsm_backend` asserts.
fn lsm_fixture(name: &str) -> Option<Fixture> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = secret_file("key.json", "{\"k\": 1}");
    let (ok_port, bad_port) = (tcp_listener(), tcp_listener());
    let forced = if kernel_has_bpf_lsm() { "file_backend = \"bpf-lsm\"\n" } else { "" };
    // `recycled_inode_is_not_the_secret`'s secret, next to the first.
    let reuse = dir.path().join(REUSE_NAME);
    std::fs::write(&reuse, "reuse").unwrap();
    let reuse = format!(
        "[[secret]]\nname = \"reuse\"\npaths = [\"{}\"]\n\
         [[intent]]\nname = \"reuse\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"reuse\"]\ndestinations = [\"127.0.0.1/32:{ok_port}\"]\nmax_ttl = \"10m\"\non_violation = \"deny\"\n",
        reuse.display()
    );
    let policy = format!(
        "mode = \"enforce\"\n{forced}[[secret]]\nname = \"key\"\npaths = [\"{secret}\"]\ndestinations = [\"127.0.0.1/32:{ok_port}\"]\n\
         [[secret]]\nname = \"other\"\npaths = [\"{secret}.other\"]\n\
         [[intent]]\nname = \"wide\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"key\"]\ndestinations = [\"127.0.0.0/8:1-65535\"]\nmax_ttl = \"10m\"\non_violation = \"deny\"\n\
         [[intent]]\nname = \"killer\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"other\"]\ndestinations = [\"127.0.0.1/32:{ok_port}\"]\nmax_ttl = \"10m\"\non_violation = \"kill\"\n{}",
        reuse
    );
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &policy);
    Some(Fixture { cg, daemon, secret, ok_port, bad_port, dir })
}

fn cat(f: &Fixture, p: &Path) -> std::process::Output {
    f.cg.command("cat").arg(p).output().unwrap()
}

fn denied(out: &std::process::Output) -> bool {
    !out.status.success()
        && String::from_utf8_lossy(&out.stderr).contains("Operation not permitted")
}

/// One daemon (each start costs tens of seconds under emulation) for every case the kernel
/// decides: every way of reaching the file fails with EPERM, attributed, with the secret's
/// device and inode as stat(2) reports them (the kernel's s_dev converted back); renamed and
/// replaced secrets; kill; the cost of a judged open; then, with the daemon SIGKILLed, the
/// pinned program keeps judging (deny, a live grant reads, a grant expires on the kernel
/// clock, a replaced secret is judged by name, taint is set in the kernel), and the restarted
/// daemon adopts the pins and reports what was decided meanwhile; monitor mode after a reload.
#[test]
fn secret_opens_are_decided_in_the_kernel() {
    let Some(mut f) = lsm_fixture("lsm") else { return };
    if !lsm_backend(&f, "lsm") {
        return;
    }
    let scale = time_scale();
    let real = std::fs::canonicalize(&f.secret).unwrap();

    // Ungranted: EPERM in the kernel, the event names the process and the inode.
    let (pid, out) = with_pid(py_run(&f, None, "read()\nprint(os.getpid())").1);
    assert_eq!(out, ["EPERM"]);
    let e = opens_of(&f, pid, 1).pop().expect("denied event");
    assert_required_fields(&e);
    assert_eq!((e.verdict.as_str(), e.action.as_str()), ("no_grant", "denied"), "{e:?}");
    assert_eq!(
        (e.process.exe.as_str(), e.process.cgroup.as_str()),
        (python().as_str(), f.cg.rel().as_str())
    );
    assert_eq!(e.file().secret, "key");
    assert_eq!(e.file().path, real.display().to_string());
    assert_eq!((e.file().dev, e.file().ino), dev_ino(&real), "kernel s_dev -> st_dev");
    assert!(e.path_has(|l| l.contains("decided in the kernel (BPF-LSM)")), "{e:?}");
    println!("ungranted open: EPERM, attributed to pid {pid}");

    // Every way of reaching the inode.
    let link = f.dir.path().join("link");
    std::os::unix::fs::symlink(&f.secret, &link).unwrap();
    let hard = f.dir.path().join("hard");
    std::fs::hard_link(&f.secret, &hard).unwrap();
    for p in [real.as_path(), &link, &hard] {
        assert!(denied(&cat(&f, p)), "cat {p:?}");
    }
    let rel = f.cg.command("cat").arg("key.json").current_dir(f.dir.path()).output().unwrap();
    assert!(denied(&rel), "relative path");
    let (_, out) = py_run(
        &f,
        None,
        "fd = os.open(SECRET, os.O_PATH)\nreport(lambda: os.open('/proc/self/fd/%d' % fd, os.O_RDONLY))",
    );
    assert_eq!(out, ["EPERM"], "/proc/self/fd re-open");
    for how in ["openat2", "uring-open"] {
        let out = f.cg.command(helper_bin()).args([how, &f.secret]).output().unwrap();
        assert!(!out.status.success(), "{how} open succeeded");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"), "{how}");
    }
    let deadline = Instant::now() + Duration::from_secs(10) * scale;
    let denied_events = || -> Vec<Event> {
        f.daemon
            .events()
            .into_iter()
            .filter(|e| e.kind == "file_open" && e.action == "denied")
            .collect()
    };
    while denied_events().len() < 8 {
        assert!(Instant::now() < deadline, "{:#?}", denied_events());
        std::thread::sleep(Duration::from_millis(50));
    }
    let ev = denied_events();
    assert!(
        ev.iter().all(|e| e.verdict == "no_grant" && e.file().ino == dev_ino(&real).1),
        "{ev:#?}"
    );
    assert!(ev.iter().any(|e| e.file().path == hard.display().to_string()), "{ev:#?}");
    println!("path, symlink, hard link, relative, /proc/self/fd, openat2, io_uring: EPERM");

    let ttl = Duration::from_secs(4) * scale;

    // Renamed away, moved to another directory: the same inode, still the secret.
    let away = f.dir.path().join("renamed.txt");
    std::fs::rename(&f.secret, &away).unwrap();
    assert!(denied(&cat(&f, &away)), "renamed away: still the secret");
    let elsewhere = tempfile::tempdir().unwrap();
    let moved = elsewhere.path().join("elsewhere");
    std::fs::rename(&away, &moved).unwrap();
    assert!(denied(&cat(&f, &moved)), "moved into another directory: still the secret");
    // Replaced: a fresh inode renamed onto the path is the secret from its first open...
    let tmp = f.dir.path().join("key.json.new");
    std::fs::write(&tmp, "{\"k\": 2}").unwrap();
    assert!(cat(&f, &tmp).status.success(), "an unrelated file opens freely");
    std::fs::rename(&tmp, &f.secret).unwrap();
    let (pid, out) = with_pid(py_run(&f, None, "read()\nprint(os.getpid())").1);
    assert_eq!(out, ["EPERM"], "the new inode at the path is the secret from its first open");
    let e = opens_of(&f, pid, 1).pop().expect("event");
    assert_eq!(e.file().ino, dev_ino(&real).1);
    // ... and stays it when renamed away in turn.
    let rotated = f.dir.path().join("rotated-out");
    std::fs::rename(&f.secret, &rotated).unwrap();
    assert!(denied(&cat(&f, &rotated)));
    std::fs::write(&f.secret, "{\"k\": 3}").unwrap();
    println!("renamed, moved and replaced secrets: EPERM");

    // A secret path that had no file (`other`, whose intent kills): created later outside
    // the cgroup, its first open in the cgroup is killed by the kernel.
    let other = PathBuf::from(format!("{}.other", f.secret));
    std::fs::write(&other, "x").unwrap();
    assert_eq!(cat(&f, &other).status.signal(), Some(9), "on_violation kill: SIGKILL");
    println!("kill: SIGKILL from the kernel");

    attacker_procedures(&f, &hard);
    secret_open_cost(&f);

    // No daemon: the pinned program keeps judging.
    let mut live = reader(&f, Some(("wide", "10m")));
    let mut short = reader(&f, Some(("wide", &format!("{}s", ttl.as_secs()))));
    let mut none = reader(&f, None);
    let (_, short_pid, none_pid) = (line(&mut live), line(&mut short), line(&mut none));
    let short_started = Instant::now();
    assert_eq!(ask(&mut live), "ok");
    assert_eq!(ask(&mut short), "ok");
    assert_eq!(conn(&mut live, f.bad_port), "EPERM", "tainted by the read: not valid there");
    let mut fresh = reader(&f, Some(("wide", "10m")));
    let _ = line(&mut fresh);
    f.daemon.kill9();
    assert_eq!(ask(&mut none), "EPERM", "no daemon: still denied in the kernel");
    assert_eq!(ask(&mut live), "ok", "no daemon: a live grant still reads");
    assert_eq!(conn(&mut short, f.ok_port), "ok", "where the secret is valid");
    std::thread::sleep(
        (short_started + ttl + Duration::from_millis(300))
            .saturating_duration_since(Instant::now()),
    );
    assert_eq!(ask(&mut short), "EPERM", "expiry continues without the daemon");
    assert!(denied(&cat(&f, &real)));
    // Replaced while no daemon runs: only the kernel, by directory and name, can judge it.
    let tmp = f.dir.path().join("key.json.next");
    std::fs::write(&tmp, "{\"k\": 4}").unwrap();
    std::fs::rename(&tmp, &f.secret).unwrap();
    let (replaced_pid, out) = with_pid(py_run(&f, None, "read()\nprint(os.getpid())").1);
    assert_eq!(out, ["EPERM"], "a new inode at the path, no daemon: judged by name");
    // Taint set by the kernel while no daemon runs.
    assert_eq!(conn(&mut fresh, f.bad_port), "ok", "untainted: the grant covers it");
    assert_eq!(ask(&mut fresh), "ok");
    assert_eq!(conn(&mut fresh, f.bad_port), "EPERM", "tainted in the kernel, no daemon running");
    recycled_inode_is_not_the_secret(&f);
    println!("SIGKILL: deny, live grant, expiry and taint kept by the pinned program");

    f.daemon.relaunch();
    assert!(f.daemon.log().contains("adopted the previous daemon's pinned maps"));
    assert_eq!(f.daemon.status_json()["file_backend"], "bpf-lsm");
    assert_eq!(ask(&mut none), "EPERM");
    assert_eq!(ask(&mut live), "ok");
    // Decided while no daemon ran: queued in the kernel's rings, reported after the restart.
    let short_pid: u32 = short_pid.parse().unwrap();
    let ev = opens_of(&f, short_pid, 2);
    assert!(ev.iter().any(|e| e.verdict == "expired" && e.action == "denied"), "{ev:#?}");
    let ev = opens_of(&f, none_pid.parse().unwrap(), 2);
    assert_eq!(ev.len(), 2, "{ev:#?}");
    let e = opens_of(&f, replaced_pid, 1).pop().expect("the replaced secret's open");
    assert!(e.path_has(|l| l.contains("judged by directory and name")), "{e:?}");
    assert_eq!(e.file().ino, dev_ino(Path::new(&f.secret)).1, "{e:?}");
    for mut c in [live, short, none, fresh] {
        let _ = c.kill();
        let _ = c.wait();
    }

    // Monitor mode (a reload): the ungranted open goes ahead, alerted.
    let text = std::fs::read_to_string(&f.daemon.config).unwrap();
    std::fs::write(&f.daemon.config, text.replace("mode = \"enforce\"", "mode = \"monitor\""))
        .unwrap();
    let out = f.daemon.cli(&["policy", "reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (pid, out) = with_pid(py_run(&f, None, "read()\nprint(os.getpid())").1);
    assert_eq!(out, ["ok"]);
    let e = opens_of(&f, pid, 1).pop().expect("alert");
    assert_eq!(
        (e.verdict.as_str(), e.action.as_str(), e.mode.as_str()),
        ("no_grant", "alerted", "monitor")
    );
    assert_eq!(e.severity, "high");
    // Renamed into another directory before the reload: still the secret after it.
    let body = format!("report(lambda: open({:?}).read())\nprint(os.getpid())", moved.display());
    let (pid, out) = with_pid(py_run(&f, None, &body).1);
    assert_eq!(out, ["ok"]);
    let e = opens_of(&f, pid, 1).pop().expect("alert for the moved secret");
    assert_eq!((e.file().secret.as_str(), e.action.as_str()), ("key", "alerted"), "{e:?}");
    println!("monitor mode: allowed, alerted; a secret moved away stays one across the reload");
}

/// The `reuse` secret's file name, in the fixture's directory.
const REUSE_NAME: &str = "reuse.key";

/// With no daemon (SIGKILLed): inode reuse. A secret moved to a name no policy watches is
/// judged by its inode alone; deleted, its SECRET_INODES entry goes when the kernel frees the
/// inode (`lsm/inode_free`), so a new file given the same inode number is not judged as the
/// secret (before: a false denial until the daemon noticed). An inode freed with links left
/// (evicted from the cache: the file still exists) keeps its entry; that half is what 9p
/// without a cache does on every open, not what the test directory (tmpfs in the guests)
/// does. tmpfs never reuses an inode number, so a reuse is asserted only where one happens.
fn recycled_inode_is_not_the_secret(f: &Fixture) {
    use std::os::fd::AsFd;
    let path = f.dir.path().join(REUSE_NAME);
    let moved = f.dir.path().join("reuse.moved");
    std::fs::rename(&path, &moved).unwrap();
    let key = {
        let fd = std::fs::File::open(&moved).unwrap(); // the test is outside cgroup_root
        enforcer::kernel::lsm::kernel_key(fd.as_fd()).unwrap()
    };
    let is_secret = || enforcer::kernel::lsm::pinned_secret_inode(&f.daemon.pin_dir, key).unwrap();
    assert!(is_secret(), "{key:?} in SECRET_INODES");
    assert!(denied(&cat(f, &moved)), "the moved secret: judged by its inode");
    std::fs::remove_file(&moved).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5) * time_scale();
    while is_secret() {
        assert!(Instant::now() < deadline, "{key:?} still in SECRET_INODES after the delete");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut recycled = None;
    for i in 0..50 {
        let p = f.dir.path().join(format!("new-{i}"));
        std::fs::write(&p, "not a secret").unwrap();
        if dev_ino(&p).1 == key.ino {
            recycled = Some(p);
            break;
        }
    }
    match &recycled {
        Some(p) => {
            let out = cat(f, p);
            assert!(out.status.success(), "recycled inode {}: {out:?}", key.ino);
            println!("inode reuse: {} got the deleted secret's inode: opens freely", p.display());
        }
        None => println!(
            "inode reuse: the deleted secret's inode {} left SECRET_INODES when freed (this file system gave its number to none of 50 new files)",
            key.ino
        ),
    }
}

/// The file attacks of attacks_files.rs, attacks.rs and file_open.rs that lsm.rs did not
/// cover yet, decided by the kernel (same daemon): `mv secret x; cat x; mv x secret`; a name
/// kept for the old inode after the path was replaced; 200 rotate-then-read in one process
/// and 200 reads racing a rotation by another process (every read of every new inode denied,
/// judged by name); non-secret files next to the secret and elsewhere, and opens from
/// outside `cgroup_root`, neither judged nor reported; taint follows the data within the
/// granted subtree (shell capture, a child forked before the read).
fn attacker_procedures(f: &Fixture, kept: &Path) {
    let scale = time_scale();
    let real = std::fs::canonicalize(&f.secret).unwrap().display().to_string();
    let (pid, out) = with_pid(py_run(f, None, RENAME_AWAY).1);
    assert_eq!(out, ["EPERM"], "mv secret x; cat x");
    let e = opens_of(f, pid, 1).pop().expect("event");
    assert_eq!((e.file().secret.as_str(), e.action.as_str()), ("key", "denied"), "{e:?}");
    assert!(denied(&cat(f, kept)), "a kept name of the old inode");

    let (pid, out) = with_pid(py_run(f, None, REPLACE_THEN_READ).1);
    assert_eq!(out, ["200 0"], "every read of a freshly replaced secret is judged");
    let ev = opens_of_within(f, pid, 200, Duration::from_secs(30));
    assert_eq!(ev.len(), 200, "one event per read, none for the temp files");
    assert!(
        ev.iter().all(|e| (e.file().secret.as_str(), e.file().path.as_str(), e.action.as_str())
            == ("key", real.as_str(), "denied")),
        "{:#?}",
        ev.iter().find(|e| e.action != "denied" || e.file().path != real)
    );
    let inodes: std::collections::HashSet<u64> = ev.iter().map(|e| e.file().ino).collect();
    assert!(inodes.len() > 1, "{inodes:?}");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = rotate_until(f.secret.clone(), stop.clone());
    let (pid, out) = with_pid(py_run(f, None, READ_200).1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rotations = writer.join().unwrap();
    assert!(rotations > 0);
    assert_eq!(out, ["0 200"], "{rotations} rotations during the reads");
    let ev = opens_of_within(f, pid, 200, Duration::from_secs(30));
    assert_eq!(ev.len(), 200, "every read judged");
    assert!(ev.iter().all(|e| e.file().secret == "key" && e.action == "denied"));
    println!(
        "mv away and back, kept name, 200 rotate-then-read, 200 reads racing {rotations} rotations: EPERM"
    );

    // Not secrets, or not in scope: opened freely, nothing recorded.
    let sibling = f.dir.path().join("readme.txt");
    std::fs::write(&sibling, "hello").unwrap();
    let body = format!(
        "report(lambda: open({s:?}).read())\nreport(lambda: open({n:?}, 'w').write('x'))\nreport(lambda: open('/etc/hostname').read())\nprint(os.getpid())",
        s = sibling.display().to_string(),
        n = f.dir.path().join("new-file").display().to_string(),
    );
    let (pid, out) = with_pid(py_run(f, None, &body).1);
    assert_eq!(out, ["ok", "ok", "ok"], "non-secret files open freely");
    assert!(std::fs::read(&f.secret).is_ok(), "outside cgroup_root: not judged");
    let (marker, _) = with_pid(py_run(f, None, "read()\nprint(os.getpid())").1);
    assert_eq!(opens_of(f, marker, 1).len(), 1, "the marker's denied open");
    let me = std::process::id();
    let stray: Vec<Event> = f
        .daemon
        .events()
        .into_iter()
        .filter(|e| e.kind == "file_open" && (e.process.pid == pid || e.process.pid == me))
        .collect();
    assert!(stray.is_empty(), "no event for non-secret files or outside opens: {stray:#?}");

    // Taint follows the data within the granted subtree (`key` is valid toward ok_port only,
    // intent `wide` covers every loopback port).
    let send = |p: u16| {
        format!(
            "{} -c \"import socket; socket.create_connection(('127.0.0.1', {p}), timeout={}).close()\" \
             && echo ok || echo denied",
            python(),
            3 * scale
        )
    };
    let script = format!("x=$(cat '{}'); {}; {}", f.secret, send(f.bad_port), send(f.ok_port));
    let out =
        f.cg.command(enforcer_bin())
            .args(["run", "--intent", "wide", "--", "sh", "-c", &script])
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .output()
            .unwrap();
    let lines: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines, ["denied", "ok"], "shell capture: {}", String::from_utf8_lossy(&out.stderr));
    let body = format!(
        "r, w = os.pipe()\npid = os.fork()\nif pid == 0:\n    os.read(r, 1)\n    conn({bad})\n    conn({ok})\n    os._exit(0)\n\
         read()\nos.write(w, b'x')\nos.waitpid(pid, 0)\n",
        bad = f.bad_port,
        ok = f.ok_port
    );
    let (_, lines) = py_run(f, Some("wide"), &body);
    assert_eq!(lines, ["ok", "EPERM", "ok"], "read, then the earlier-forked child's two connects");
    println!("non-secret and out-of-scope opens unjudged; taint follows the data in the subtree");
}

/// `file_backend`: "fanotify" never loads the program; "bpf-lsm" refuses to start where
/// the kernel refuses BPF-LSM, naming why (where the kernel runs it, the lsm fixture starts
/// with it); the default (auto) follows the kernel (tests/matrix.rs checks it on each kernel).
#[test]
fn backend_choice_follows_the_config_and_the_kernel() {
    if !root_or_skip("lsm-choice") {
        return;
    }
    let cg = TestCgroup::new("lsm-choice");
    let (_d, secret) = secret_file("key", "x");
    let mut d = Daemon::start(
        &cg,
        &format!("file_backend = \"fanotify\"\n{}", secret_toml("key", &secret)),
    );
    let st = d.status_json();
    assert_eq!(st["file_backend"], "fanotify");
    assert!(!st["programs"].as_array().unwrap().iter().any(|p| p == "lsm/file_open"), "{st:#}");
    assert!(st["fail_open"][0].as_str().unwrap().contains("fails open"), "{st:#}");
    assert!(d.stop().success());
    d.remove_pins();
    let forced = Daemon::configure(
        &cg,
        &format!("file_backend = \"bpf-lsm\"\n{}", secret_toml("key", &secret)),
    );
    if kernel_has_bpf_lsm() {
        // Started (status `file_backend` "bpf-lsm", "fails closed") by the lsm fixture: one
        // daemon start less under emulation.
        forced.remove_pins();
    } else {
        let out = std::process::Command::new(enforcer_bin())
            .args(["daemon", "--config"])
            .arg(&forced.config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("file_backend = \"bpf-lsm\" but this kernel refuses"), "{err}");
        forced.remove_pins();
        eprintln!("SKIP lsm-choice (bpf-lsm half): this kernel refuses BPF-LSM: {err}");
    }
}

/// The cost of a granted secret open judged in the kernel, as a ratio to a plain open in
/// another directory (both with the program attached, by the same granted process), in the
/// same machine, wall clock and the opener's own CPU time, printed for the log. Not asserted:
/// performance is the bench's job (`cargo xtask bench --kernel`, target 1.5x), and under
/// emulation on a loaded host even the CPU-time ratio moved between 1.2x and 4.9x from one
/// run to the next. What is asserted is that every granted open was judged and recorded.
fn secret_open_cost(f: &Fixture) {
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = plain_dir.path().join("plain.txt");
    std::fs::write(&plain, "x").unwrap();
    let n = 500;
    let cost = |path: &str| -> (u64, u64) {
        let out =
            f.cg.command(enforcer_bin())
                .args(["run", "--intent", "wide", "--"])
                .arg(helper_bin())
                .args(["open-loop", path, &n.to_string()])
                .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
                .output()
                .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
        if path == f.secret {
            // Every granted open is recorded, allowed under the grant. Waiting for the
            // records also keeps the next `enforcer run` from queueing its grant request
            // behind them (under emulation they take the daemon seconds).
            let pid: u32 = text
                .lines()
                .find_map(|l| l.strip_prefix("ok "))
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or_else(|| panic!("no pid from the helper: {text}"));
            let ev = opens_of_within(f, pid, n, Duration::from_secs(60));
            assert_eq!(ev.len(), n, "granted opens recorded");
            assert!(
                ev.iter()
                    .all(|e| (e.verdict.as_str(), e.action.as_str()) == ("allowed", "allowed")
                        && e.grant().intent == "wide"),
                "{:#?}",
                ev.iter().find(|e| e.verdict != "allowed")
            );
        }
        let field = |k: &str| -> u64 {
            text.lines().find_map(|l| l.strip_prefix(k)).unwrap().trim().parse().unwrap()
        };
        (field("ns "), field("cpu_ns "))
    };
    // Best of 2 each, interleaved.
    let (mut plain_ns, mut secret_ns) = ((u64::MAX, u64::MAX), (u64::MAX, u64::MAX));
    let best = |a: (u64, u64), b: (u64, u64)| (a.0.min(b.0), a.1.min(b.1));
    for _ in 0..2 {
        plain_ns = best(plain_ns, cost(plain.to_str().unwrap()));
        secret_ns = best(secret_ns, cost(&f.secret));
    }
    let wall = secret_ns.0 as f64 / plain_ns.0 as f64;
    let cpu = secret_ns.1 as f64 / plain_ns.1.max(1) as f64;
    println!(
        "secret open+close (granted, judged in the kernel) {} ns, plain open+close {} ns: {wall:.2}x wall; \
         CPU time of the opener {} / {} ns: {cpu:.2}x",
        secret_ns.0, plain_ns.0, secret_ns.1, plain_ns.1
    );
}
