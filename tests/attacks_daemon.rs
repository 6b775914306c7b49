//! The attacker's procedures against the daemon itself (issue 13), each with its fixed
//! outcome: a hostile local process trying to stall decisions, exhaust the daemon, read
//! other subjects' tokens, steal a grant through pid reuse, or drown an alert.
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use enforcer_tests::*;

/// Times `n` opens of `path` from a fresh python in the cgroup: "<outcomes> <p50 ms> <max ms>".
fn open_prober(cg: &TestCgroup, path: &str, n: u32) -> std::process::Child {
    let script = format!(
        r#"
import errno, os, time
lat = []; res = set()
for i in range({n}):
    t = time.monotonic()
    try:
        os.close(os.open({path:?}, os.O_RDONLY)); res.add("ok")
    except OSError as e:
        res.add(errno.errorcode.get(e.errno, str(e.errno)))
    lat.append(time.monotonic() - t)
lat.sort()
print(",".join(sorted(res)), round(lat[len(lat) // 2] * 1000, 3), round(lat[-1] * 1000, 3), flush=True)
"#
    );
    cg.command(python()).args(["-c", &script]).stdout(Stdio::piped()).spawn().unwrap()
}

/// Waits for `child` at most `limit`; panics (after killing it) if it is still blocked.
fn wait_bounded(mut child: std::process::Child, limit: Duration, what: &str) -> String {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still blocked after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every stored event, rotated backups (events.jsonl.N, oldest first) included.
fn all_events(d: &Daemon) -> Vec<Event> {
    let live = d.state_dir().join("events.jsonl");
    let mut files: Vec<std::path::PathBuf> = (1..)
        .map(|i| d.state_dir().join(format!("events.jsonl.{i}")))
        .take_while(|p| p.exists())
        .collect();
    files.reverse();
    files.push(live);
    files
        .iter()
        .flat_map(|f| parse_events(&std::fs::read_to_string(f).unwrap_or_default()))
        .collect()
}

fn copy_exe(from: &str, to: &std::path::Path) {
    std::fs::copy(from, to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Case 1. Attack: a sparse 2 TiB copy of `cat` opens a watched secret, three times at once,
/// so the (old) daemon would hash 2 TiB per alert before answering. Fixed: the size check happens
/// on the hash worker from the pinned image's fstat, the alert says why the hash is unknown,
/// and the other opens of the secret made meanwhile are answered as promptly as ever.
#[test]
fn a_2tib_sparse_binary_opening_a_secret_does_not_stall_decisions() {
    if !root_or_skip("a_2tib_sparse_binary_opening_a_secret_does_not_stall_decisions") {
        return;
    }
    let (_sdir, secret) = secret_file("token", "s3cr3t-value\n");
    let bin = tempfile::tempdir().unwrap();
    let big = bin.path().join("bigcat");
    copy_exe(&which("cat"), &big);
    std::fs::File::options().write(true).open(&big).unwrap().set_len(2 << 40).unwrap();
    let cg = TestCgroup::new("hash-2tib");
    let d = Daemon::start(&cg, &secret_toml("token", &secret));
    let t0 = Instant::now();
    let attackers: Vec<std::process::Child> = (0..3)
        .map(|_| {
            cg.command(&big)
                .arg(&secret)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let prober = open_prober(&cg, &secret, 200);
    let probe = wait_bounded(prober, Duration::from_secs(60), "the open prober");
    let mut pids = Vec::new();
    for a in attackers {
        pids.push(a.id());
        wait_bounded(a, Duration::from_secs(60), "the 2 TiB attacker");
    }
    let elapsed = t0.elapsed();
    // The status is rendered once a second.
    std::thread::sleep(Duration::from_millis(1200));
    let fields: Vec<&str> = probe.split_whitespace().collect();
    assert_eq!(fields[0], "ok", "every probe open answered (monitor mode): {probe}");
    let (p50, max): (f64, f64) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    eprintln!(
        "200 opens during the 2 TiB attack: p50 {p50} ms, max {max} ms; whole attack {elapsed:?}; \
         daemon file_decision_us {}",
        d.status_json()["file_decision_us"]
    );
    // Loose bound (shared 2-core CI): far below what hashing 2 TiB would take (minutes).
    assert!(max < 2000.0, "an open waited {max} ms during the attack");
    assert!(d.status_ok(), "daemon alive");
    for pid in pids {
        let e = d.one_event("file_open by the 2 TiB attacker", by("file_open", pid));
        assert_eq!(e.verdict, "no_grant");
        assert_eq!(e.process.exe_sha256, Some(None), "hash unknown: {e:?}");
        let why = e.process.exe_sha256_unknown.clone().unwrap_or_default();
        assert!(why.contains("too large"), "reason: {why}");
    }
    let probes = d.wait_events("probe opens", |e| e.kind == "file_open" && e.verdict == "no_grant");
    assert!(probes.len() >= 203, "every probe open recorded: {}", probes.len());
    assert_eq!(d.status_json()["file_decision_us"]["over_deadline"], 0);
}

/// The environment read, attacked. Exec records used to cost the daemon a read of
/// `/proc/PID/environ` on its main loop. Attack: an exec storm whose every process carries a
/// differently named variable and a credential-shaped one, while attackers whose environments
/// are as large as exec allows (about 1.8 MB: the read copies the most pages a process can
/// offer) open the watched secret in a loop and then stop themselves (SIGSTOP). Fixed: exec
/// records cost no `/proc` read; environments are read by reader threads (processes still
/// running after the batch, at most 500/s; an alert's process at once), so the opens of a
/// prober are answered as promptly as ever, and every alert still carries its own process's
/// job (the prober's, the attackers'), read while the alert waited off the main loop.
#[test]
fn an_exec_storm_and_huge_environments_do_not_delay_decisions_and_alerts_keep_their_job() {
    if !root_or_skip(
        "an_exec_storm_and_huge_environments_do_not_delay_decisions_and_alerts_keep_their_job",
    ) {
        return;
    }
    let (_sdir, secret) = secret_file("token", "s3cr3t-value\n");
    let cg = TestCgroup::new("env-storm");
    let d = Daemon::start(&cg, &secret_toml("token", &secret));
    let mut storm = cg
        .command("sh")
        .args([
            "-c",
            "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); \
             env STORM_$((i % 1000))=v$i STORM_API_TOKEN=t$i /bin/true; done",
        ])
        .spawn()
        .unwrap();
    let script = format!(
        "import os, signal\nfor i in range(50):\n    os.close(os.open({secret:?}, os.O_RDONLY))\n\
         os.kill(os.getpid(), signal.SIGSTOP)\n"
    );
    let big = "x".repeat(120 * 1024);
    let attackers: Vec<std::process::Child> = (0..3)
        .map(|i| {
            let mut c = cg.command(python());
            c.args(["-c", &script]).env("ENFORCER_JOB_ID", format!("attacker-{i}"));
            for v in 0..14 {
                c.env(format!("HUGE_{v}"), &big);
            }
            c.spawn().unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let script = format!(
        r#"
import os, time
lat = []
for i in range(200):
    t = time.monotonic(); os.close(os.open({secret:?}, os.O_RDONLY)); lat.append(time.monotonic() - t)
    time.sleep(0.002)
lat.sort()
print(round(lat[len(lat) // 2] * 1000, 3), round(lat[-1] * 1000, 3), flush=True)
"#
    );
    let prober = cg
        .command(python())
        .args(["-c", &script])
        .env("ENFORCER_JOB_ID", "probe-job")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let prober_pid = prober.id();
    let probe = wait_bounded(prober, Duration::from_secs(60), "the prober");
    let _ = storm.kill();
    let _ = storm.wait();
    let fields: Vec<f64> = probe.split_whitespace().map(|f| f.parse().unwrap()).collect();
    // The status is rendered once a second.
    std::thread::sleep(Duration::from_millis(1200));
    let st = d.status_json();
    eprintln!(
        "200 prober opens during the storm: p50 {} ms, max {} ms; file_decision_us {}; \
         env_reads {}; env_wait {}; execs {}",
        fields[0],
        fields[1],
        st["file_decision_us"],
        st["env_reads"],
        st["env_wait"],
        st["counts"]["execs"]
    );
    // Loose bound (shared 2-core CI): an open never waits on the storm's reads.
    assert!(fields[1] < 2000.0, "an open waited {} ms", fields[1]);
    assert_eq!(st["file_decision_us"]["over_deadline"], 0);
    let execs = st["counts"]["execs"].as_u64().unwrap();
    let read = st["env_reads"]["read"].as_u64().unwrap();
    assert!(execs > 1000, "the storm ran: {execs} execs");
    assert!(read < execs / 4, "environments read for {read} of {execs} execs: not bounded");
    let probes = d.wait_events("the prober's 200 alerts", |e| {
        e.kind == "file_open" && e.process.pid == prober_pid
    });
    assert_eq!(probes.len(), 200);
    for e in &probes {
        assert_eq!(e.process.job.as_ref().map(|j| j.id.as_str()), Some("probe-job"), "{e:?}");
        assert!(e.process.env_unknown.is_none(), "{e:?}");
    }
    for (i, a) in attackers.iter().enumerate() {
        let alerts = d.wait_events("an attacker's 50 alerts", |e| {
            e.kind == "file_open" && e.process.pid == a.id()
        });
        assert_eq!(alerts.len(), 50);
        let job = format!("attacker-{i}");
        let e = &alerts[alerts.len() - 1];
        assert_eq!(e.process.job.as_ref().map(|j| j.id.as_str()), Some(job.as_str()), "{e:?}");
        // Alerts of one process are written in the order they were made.
        let ids: Vec<u64> =
            alerts.iter().map(|e| e.id.rsplit('-').next().unwrap().parse().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }
    for mut a in attackers {
        let _ = a.kill();
        let _ = a.wait();
    }
    assert!(d.status_ok(), "daemon alive");
}

/// Reads of another process's memory, attacked. A process the lineage records never showed
/// the daemon (one running before the daemon starts; one whose fork and exec records were
/// lost) had its `/proc/PID/cmdline` (and environment) read on the daemon's main loop, at
/// start for every process. Attack: a process holds its own `mmap_lock` through a FUSE file
/// whose reads are never answered (`support/fuse_stall.rs`), so a read of its command line or
/// environment never returns; it is running when the daemon starts, then opens the secret and
/// connects while another process opens the secret 200 times. Before: the daemon never got
/// ready. Fixed: the main loop reads no process's memory; what cannot block (`status`, the
/// exe link, the cgroup) is read at start, the rest by reader threads; the hostage's alert
/// waits at most 200 ms and says what is missing; nobody else's decisions or events wait.
#[test]
fn a_process_holding_its_mmap_lock_does_not_stall_the_daemon() {
    if !root_or_skip("a_process_holding_its_mmap_lock_does_not_stall_the_daemon") {
        return;
    }
    use enforcer_tests::fuse_stall::{KillOnDrop, StallFs, hostage_script};
    // Declared first, so dropped last: a failed assertion leaves the hostage stuck on the
    // file system, and the cgroup can only be removed once it is released and killed.
    let cg = TestCgroup::new("mmap-lock");
    // Dropped last, even on a failure: the file system is released first, then it is killed.
    let mut guard = KillOnDrop::default();
    let Some(fs) = StallFs::mount() else { return };
    let (_sdir, secret) = secret_file("token", "s3cr3t-value\n");
    let port = tcp_listener();
    let script = hostage_script(&fs.file(), &secret, port);
    let errors = tempfile::NamedTempFile::new().unwrap();
    let mut hostage = cg
        .command(python())
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(errors.reopen().unwrap())
        .spawn()
        .unwrap();
    let pid = hostage.id();
    let mut to_hostage = hostage.stdin.take().unwrap();
    let out = hostage.stdout.take().unwrap();
    guard.0 = Some(hostage);
    let lines = {
        let (tx, rx) = std::sync::mpsc::channel();
        let out = std::io::BufReader::new(out);
        std::thread::spawn(move || {
            for l in std::io::BufRead::lines(out).map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        rx
    };
    let line = lines.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let stderr = std::fs::read_to_string(errors.path()).unwrap_or_default();
    assert_eq!(line, "stalled", "the hostage set up its hold: {stderr}");
    // The hold is real: a read of its command line does not return.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(format!("/proc/{pid}/cmdline")).map(|b| b.len()));
    });
    let read = rx.recv_timeout(Duration::from_millis(500));
    assert!(read.is_err(), "reading the hostage's command line returned: {read:?}");

    let t0 = Instant::now();
    let d = Daemon::start(&cg, &secret_toml("token", &secret));
    let ready = t0.elapsed();
    use std::io::Write as _;
    writeln!(to_hostage, "go").unwrap();
    let prober = open_prober(&cg, &secret, 200);
    let probe = wait_bounded(prober, Duration::from_secs(60), "the open prober");
    let used = lines.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
    assert_eq!(used, "open:ok connect:ok", "the hostage's own uses (monitor mode)");
    let fields: Vec<&str> = probe.split_whitespace().collect();
    assert_eq!(fields[0], "ok", "every probe open answered (monitor mode): {probe}");
    let (p50, max): (f64, f64) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    std::thread::sleep(Duration::from_millis(1200));
    let st = d.status_json();
    eprintln!(
        "daemon ready in {ready:?} with the hostage running; 200 opens meanwhile: p50 {p50} ms, \
         max {max} ms; file_decision_us {}; env_reads {}",
        st["file_decision_us"], st["env_reads"]
    );
    assert!(max < 2000.0, "an open waited {max} ms");
    assert_eq!(st["file_decision_us"]["over_deadline"], 0);
    // The hostage's alert: written after at most 200 ms, with what could be read.
    let e = d.one_event("file_open by the hostage", by("file_open", pid));
    assert_eq!(e.verdict, "no_grant");
    let why = e.process.facts_unknown.clone().unwrap_or_default();
    assert!(why.contains("not read within 200 ms"), "facts_unknown: {why:?}");
    assert!(e.process.exe.contains("python"), "exe read without its memory: {e:?}");
    assert_eq!(e.process.cmdline, "", "its command line was never read");
    assert!(e.process.env_unknown.is_some(), "{e:?}");
    let c = d.wait_events("the hostage's connect", by("connect", pid));
    assert_eq!(c[0].process.uid, 0, "the record's facts: {:?}", c[0].process);
    // Everyone else's events, complete.
    let probes = d.wait_events("probe opens", |e| {
        e.kind == "file_open" && e.verdict == "no_grant" && e.process.pid != pid
    });
    assert_eq!(probes.len(), 200, "every probe open recorded");
    assert!(
        probes
            .iter()
            .all(|e| e.process.facts_unknown.is_none() && e.process.exe.contains("python"))
    );
    // Released, the hostage's command line is read after all.
    fs.release();
    drop(to_hostage);
    let hostage = guard.0.take().unwrap();
    let _ = wait_bounded(hostage, Duration::from_secs(20), "the released hostage");
    assert!(d.status_ok(), "daemon alive");
}

/// Case 1, the path swap. Attack: a copy of `cat` opens the secret and its path is at once
/// replaced by a FIFO (the old code fell back to hashing the recorded path, and a FIFO
/// blocks its reader forever). Fixed: the running image was pinned at event time; the path
/// is never opened: the alert carries the real binary's hash and decisions go on.
#[test]
fn an_exe_path_swapped_for_a_fifo_does_not_block_the_daemon() {
    if !root_or_skip("an_exe_path_swapped_for_a_fifo_does_not_block_the_daemon") {
        return;
    }
    let (_sdir, secret) = secret_file("token", "s3cr3t-value\n");
    let bin = tempfile::tempdir().unwrap();
    let swap = bin.path().join("swapcat");
    copy_exe(&which("cat"), &swap);
    let sum = Command::new("sha256sum").arg(&swap).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout).split_whitespace().next().unwrap().to_string();
    let cg = TestCgroup::new("hash-fifo");
    let d = Daemon::start(&cg, &secret_toml("token", &secret));
    let script = format!(
        "sleep 1 | {swap} {secret} - >/dev/null & p=$!; sleep 0.3; rm -f {swap}; mkfifo {swap}; \
         wait $p; echo $p",
        swap = swap.display()
    );
    let (_, out) = cg.run("sh", &["-c", &script]);
    let pid: u32 = out.trim().parse().unwrap();
    let probe = wait_bounded(open_prober(&cg, &secret, 50), Duration::from_secs(30), "prober");
    assert!(probe.starts_with("ok "), "monitor mode: opens allowed: {probe}");
    let e = d.one_event("file_open by the swapped exe", by("file_open", pid));
    assert_eq!(e.verdict, "no_grant");
    assert_eq!(e.process.exe_sha256, Some(Some(sum)), "the pinned image's hash: {e:?}");
    assert!(d.status_ok(), "daemon alive");
}

/// `curl --unix-socket` as uid/gid 65534 (nobody) inside the cgroup: (HTTP status, JSON).
fn curl_as_nobody(
    cg: &TestCgroup,
    d: &Daemon,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let sock = d.runtime_dir().join("mint.sock");
    let mut cmd = cg.command("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "curl", "-s", "-m", "10"])
        .args(["-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&sock)
        .args(["-X", method]);
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    cmd.arg(format!("http://localhost{path}"));
    parse_curl(&cmd.output().expect("curl"))
}

fn parse_curl(out: &std::process::Output) -> (u16, serde_json::Value) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// A daemon whose socket uid 65534 may use (group nogroup, directories traversable), with an
/// intent `job` both root and nobody may request. `extra` goes first (e.g. `[limits]` keys
/// must come after the top-level ones: it is appended last).
fn two_uid_daemon(cg: &TestCgroup, top: &str, limits: &str) -> Daemon {
    let port = tcp_listener();
    let policy = format!(
        "{top}socket_group = \"nogroup\"\n[[intent]]\nname = \"job\"\n\
         agents = [{{ uid = 0 }}, {{ uid = 65534 }}]\ndestinations = [\"127.0.0.1/32:{port}\"]\n\
         [limits]\n{limits}\n"
    );
    let d = Daemon::configure(cg, &policy);
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    d.launch()
}

/// The enforcer binary where uid 65534 can run it.
fn enforcer_for_nobody() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("enforcer");
    copy_exe(&enforcer_bin().display().to_string(), &bin);
    (dir, bin)
}

/// `enforcer run --intent job -- CMD...` as nobody in the cgroup, in the background.
fn run_as_nobody(
    cg: &TestCgroup,
    d: &Daemon,
    bin: &std::path::Path,
    cmd: &[&str],
) -> std::process::Child {
    cg.command("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bin)
        .args(["run", "--intent", "job", "--ttl", "2m", "--"])
        .args(cmd)
        .env("ENFORCER_RUNTIME_DIR", d.runtime_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Active grants as root sees them.
fn active_grants(d: &Daemon) -> Vec<serde_json::Value> {
    let (code, v) = d.curl("GET", "/v1/grants?state=active", None);
    assert_eq!(code, 200, "{v}");
    v["grants"].as_array().cloned().unwrap_or_default()
}

fn wait_active(d: &Daemon, n: usize) -> Vec<serde_json::Value> {
    let t0 = Instant::now();
    loop {
        let g = active_grants(d);
        if g.len() >= n {
            return g;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "{n} active grants expected: {g:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Case 4. Attack: any client of the socket lists every grant's token. Fixed: a token is shown
/// to root and to processes of the subject's uid inside the subject's subtree; everyone
/// else sees ids and metadata.
#[test]
fn grant_tokens_are_shown_only_to_their_subject_or_root() {
    if !root_or_skip("grant_tokens_are_shown_only_to_their_subject_or_root") {
        return;
    }
    let cg = TestCgroup::new("token-vis");
    let d = two_uid_daemon(&cg, "", "");
    let (_bd, bin) = enforcer_for_nobody();
    // root's grant, held by a sleeping subtree.
    let mut root_run = cg
        .command(&bin)
        .args(["run", "--intent", "job", "--ttl", "2m", "--", "sleep", "30"])
        .env("ENFORCER_RUNTIME_DIR", d.runtime_dir())
        .spawn()
        .unwrap();
    let mut nobody_run = run_as_nobody(&cg, &d, &bin, &["sleep", "30"]);
    let grants = wait_active(&d, 2);
    let root_id = grants.iter().find(|g| g["subject"]["uid"] == 0).unwrap()["id"].clone();
    let nobody_id = grants.iter().find(|g| g["subject"]["uid"] == 65534).unwrap()["id"].clone();
    // Root sees every token.
    assert!(grants.iter().all(|g| g["token"].as_str().is_some_and(|t| t.len() > 20)), "{grants:?}");
    // nobody, outside any subject's subtree: metadata only, not even its own uid's token.
    let (code, v) = curl_as_nobody(&cg, &d, "GET", "/v1/grants", None);
    assert_eq!(code, 200, "{v}");
    let listed = v["grants"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{v}");
    assert!(listed.iter().all(|g| g.get("token").is_none() && g["id"].is_string()), "{v}");
    let (code, one) =
        curl_as_nobody(&cg, &d, "GET", &format!("/v1/grants/{}", root_id.as_str().unwrap()), None);
    assert_eq!(code, 200);
    assert!(one.get("token").is_none(), "root's grant token leaked to nobody: {one}");
    // nobody inside its own grant's subtree: its own token, still not root's.
    let sock = d.runtime_dir().join("mint.sock").display().to_string();
    let mut inside = run_as_nobody(
        &cg,
        &d,
        &bin,
        &[
            "curl",
            "-s",
            "-m",
            "10",
            "--unix-socket",
            &sock,
            "http://localhost/v1/grants?state=active",
        ],
    );
    let out = inside.stdout.take().unwrap();
    let st = inside.wait().unwrap();
    assert!(st.success());
    let v: serde_json::Value = serde_json::from_reader(out).unwrap();
    let listed = v["grants"].as_array().unwrap();
    let own = listed.iter().filter(|g| g["token"].is_string()).collect::<Vec<_>>();
    assert_eq!(own.len(), 1, "exactly its own grant's token: {v}");
    assert_eq!(own[0]["subject"]["uid"], 65534);
    assert_ne!(own[0]["id"], root_id);
    assert_ne!(own[0]["id"], nobody_id, "a new grant of its own (run inside run)");
    for c in [&mut root_run, &mut nobody_run] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Case 3, quotas. Attack: one uid takes every grant slot. Fixed: past
/// `limits.mint_grants_per_uid` live grants a request gets 429 `quota_exceeded` (JSON) and a
/// `mint_refused` event records it.
#[test]
fn a_uid_past_its_grant_quota_gets_429_and_an_event() {
    if !root_or_skip("a_uid_past_its_grant_quota_gets_429_and_an_event") {
        return;
    }
    let cg = TestCgroup::new("quota");
    let d = two_uid_daemon(&cg, "", "mint_grants_per_uid = 2\n");
    let (_bd, bin) = enforcer_for_nobody();
    let mut holders: Vec<_> =
        (0..2).map(|_| run_as_nobody(&cg, &d, &bin, &["sleep", "30"])).collect();
    wait_active(&d, 2);
    let (code, v) = curl_as_nobody(&cg, &d, "POST", "/v1/grants", Some(r#"{"intent":"job"}"#));
    assert_eq!(code, 429, "{v}");
    assert_eq!(v["error"]["code"], "quota_exceeded", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("uid 65534") && msg.contains("mint_grants_per_uid"), "{msg}");
    let e = d.one_event("mint_refused for the quota", |e| {
        e.kind == "mint_refused" && e.path_has(|p| p.contains("quota_exceeded"))
    });
    assert_eq!(e.process.uid, 65534);
    assert_eq!(e.action, "denied");
    // Root is not held to the uid quota.
    let (code, v) = d.curl("POST", "/v1/grants", Some(r#"{"intent":"job"}"#));
    assert_eq!(code, 201, "{v}");
    // A refusal by the selector (403) is an event too.
    let (code, v) = d.curl("POST", "/v1/grants", Some(r#"{"intent":"nope"}"#));
    assert_eq!(code, 404, "{v}");
    d.one_event("mint_refused for an unknown intent", |e| {
        e.kind == "mint_refused" && e.path_has(|p| p.contains("unknown_intent"))
    });
    // The quota counts active grants only: once one of the uid's grants is revoked, the uid
    // may take another one.
    let theirs = active_grants(&d)
        .into_iter()
        .find(|g| g["subject"]["uid"] == 65534)
        .expect("an active grant of uid 65534");
    let id = theirs["id"].as_str().unwrap();
    let (code, v) = d.curl("DELETE", &format!("/v1/grants/{id}"), None);
    assert_eq!(code, 200, "{v}");
    let (code, v) = curl_as_nobody(&cg, &d, "POST", "/v1/grants", Some(r#"{"intent":"job"}"#));
    assert_eq!(code, 201, "a revoked grant still counts: {v}");
    for h in &mut holders {
        let _ = h.kill();
        let _ = h.wait();
    }
}

/// Case 3, per-uid rate. Attack: a client forks a new process for every request, so each
/// gets a fresh (uid, pid) bucket. Fixed: the bucket is per uid: 40 requests from 40
/// processes get at most the burst plus the refill.
#[test]
fn a_fork_per_request_client_is_held_to_the_per_uid_rate() {
    if !root_or_skip("a_fork_per_request_client_is_held_to_the_per_uid_rate") {
        return;
    }
    let cg = TestCgroup::new("rate-uid");
    let d = two_uid_daemon(&cg, "mint_rate_per_second = 5\n", "");
    let sock = d.runtime_dir().join("mint.sock");
    let script = format!(
        r#"
import json, os, socket
codes = []
for i in range(40):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        s = socket.socket(socket.AF_UNIX); s.connect({sock:?})
        b = b'{{"intent": "job", "ttl": "1m"}}'
        s.sendall(b'POST /v1/grants HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n' % len(b) + b)
        out = b''
        while True:
            c = s.recv(65536)
            if not c: break
            out += c
        os.write(w, out.split()[1]); os._exit(0)
    os.close(w)
    codes.append(int(os.read(r, 16))); os.close(r)
    os.waitpid(pid, 0)
print(json.dumps(codes))
"#,
        sock = sock.display().to_string()
    );
    let t0 = Instant::now();
    let (_, out) = cg.run(&python(), &["-c", &script]);
    let secs = t0.elapsed().as_secs_f64();
    let codes: Vec<u16> = serde_json::from_str(out.trim()).unwrap();
    let ok = codes.iter().filter(|c| **c == 201).count();
    let limited = codes.iter().filter(|c| **c == 429).count();
    eprintln!("40 forked requests in {secs:.2} s: {ok} issued, {limited} rate limited");
    assert_eq!(ok + limited, 40, "{codes:?}");
    // Burst 10 plus 5/s refill while the loop ran.
    assert!(ok as f64 <= 10.0 + 5.0 * secs + 1.0, "per-uid rate exceeded: {ok} in {secs:.2} s");
    assert!(limited >= 10, "{codes:?}");
    // Refusals are summarised (one event per uid and code per second), never lost silently.
    let ev = d.wait_events("rate-limit refusals", |e| {
        e.kind == "mint_refused" && e.path_has(|p| p.contains("rate_limited"))
    });
    assert!(!ev.is_empty());
}

/// Case 3, connections. Attack: 600 idle connections to the mint socket (the old daemon had
/// 1024 fds; fanotify then could not hand over events and outbox rotation failed). Fixed:
/// past `limits.api_max_connections` new ones get 503 at once; idle ones are closed after
/// `limits.api_idle_timeout_seconds`; secret opens are judged and recorded throughout.
#[test]
fn six_hundred_idle_api_connections_do_not_stop_decisions() {
    if !root_or_skip("six_hundred_idle_api_connections_do_not_stop_decisions") {
        return;
    }
    let (_sdir, secret) = secret_file("token", "s3cr3t-value\n");
    let cg = TestCgroup::new("idle-conns");
    let d = Daemon::start(
        &cg,
        &format!(
            "{}[limits]\napi_max_connections = 256\napi_idle_timeout_seconds = 8\n\
             [outbox]\nrotate_bytes = 65536\n",
            secret_toml("token", &secret)
        ),
    );
    let sock = d.runtime_dir().join("mint.sock");
    let dpid = d.child.as_ref().unwrap().id();
    let fds_before = std::fs::read_dir(format!("/proc/{dpid}/fd")).unwrap().count();
    let t0 = Instant::now();
    let mut conns = Vec::new();
    let mut refused_fast = 0;
    for _ in 0..600 {
        conns.push(std::os::unix::net::UnixStream::connect(&sock).expect("connect"));
    }
    let opened = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    for s in &mut conns {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 512];
        if let Ok(n) = std::io::Read::read(s, &mut b)
            && String::from_utf8_lossy(&b[..n]).contains("too_many_connections")
        {
            refused_fast += 1;
        }
        s.set_nonblocking(false).unwrap();
    }
    eprintln!("600 connections opened in {opened:?}; {refused_fast} answered 503 at once");
    assert!(refused_fast >= 600 - 256, "past the cap: 503 at once ({refused_fast})");
    // While they are held: secret opens are judged and recorded.
    let probe = wait_bounded(open_prober(&cg, &secret, 100), Duration::from_secs(30), "prober");
    assert!(probe.starts_with("ok "), "{probe}");
    let fds_during = std::fs::read_dir(format!("/proc/{dpid}/fd")).unwrap().count();
    eprintln!("daemon fds: {fds_before} before, {fds_during} with 600 clients; probe {probe}");
    assert!(fds_during < fds_before + 2 * 256 + 16, "fds bounded by the cap: {fds_during}");
    let t1 = Instant::now();
    let opens = loop {
        let n = all_events(&d).iter().filter(|e| e.kind == "file_open").count();
        if n >= 100 || t1.elapsed() > Duration::from_secs(10) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(opens >= 100, "every open recorded (outbox rotated meanwhile): {opens}");
    // Idle ones are closed by the daemon.
    std::thread::sleep(Duration::from_secs(9));
    let mut closed = 0;
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
        let mut b = [0u8; 512];
        if std::io::Read::read(s, &mut b).is_ok() {
            closed += 1;
        }
    }
    assert_eq!(closed, 600, "every connection closed (refused or idle)");
    let st = d.status_json();
    eprintln!("api: {}", st["api"]);
    assert!(st["api"]["refused"].as_u64().unwrap() >= 600 - 256, "{}", st["api"]);
    assert!(st["api"]["idle_closed"].as_u64().unwrap() >= 1, "{}", st["api"]);
    assert_eq!(st["api"]["open"], 1, "only the status request itself: {}", st["api"]);
    drop(conns);
    assert!(d.status_ok());
}

/// Case 3, one user against everyone. Attack: an unprivileged user holds 100 idle connections
/// to starve other clients of the API. Fixed: a non-root uid gets at most
/// `limits.api_max_connections_per_uid` (here 16); the rest get 503 at once, and root (here the
/// CLI) is still served.
#[test]
fn one_uid_cannot_take_every_api_connection() {
    if !root_or_skip("one_uid_cannot_take_every_api_connection") {
        return;
    }
    let cg = TestCgroup::new("uid-conns");
    let d = two_uid_daemon(
        &cg,
        "",
        "api_max_connections_per_uid = 16\napi_idle_timeout_seconds = 20\n",
    );
    let sock = d.runtime_dir().join("mint.sock");
    let script = format!(
        r#"
import socket, time
held = []; refused = 0
for i in range(100):
    s = socket.socket(socket.AF_UNIX); s.connect({sock:?}); s.settimeout(0.05)
    try:
        if b"too_many_connections" in s.recv(4096): refused += 1
    except socket.timeout:
        pass
    held.append(s)
print(refused, flush=True)
time.sleep(3)
"#,
        sock = sock.display().to_string()
    );
    let mut hog = cg
        .command("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hog.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let refused: u32 = line.trim().parse().unwrap_or_else(|_| panic!("hog said {line:?}"));
    // While the hog holds its 16: root is served.
    let out = d.cli(&["status", "--json"]);
    assert!(out.status.success(), "root served while uid 65534 holds its connections");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("uid 65534 opened 100 connections: {refused} refused at once; api {}", st["api"]);
    assert_eq!(refused, 100 - 16, "all but 16 refused at once");
    assert_eq!(st["api"]["open"], 17, "16 of the hog, 1 of root: {}", st["api"]);
    let _ = hog.kill();
    let _ = hog.wait();
}

/// /proc/PID/stat field 22, clock ticks since boot.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

fn ticks_to_ns(t: u64) -> u64 {
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    t * 1_000_000_000 / hz
}

/// Waits (up to 2 s) until process `holder` holds a pidfd of `pid`.
fn wait_for_pidfd(holder: u32, pid: u32) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{holder}/fdinfo")) {
            for e in rd.flatten() {
                let info = std::fs::read_to_string(e.path()).unwrap_or_default();
                if info
                    .lines()
                    .any(|l| l.strip_prefix("Pid:").is_some_and(|v| v.trim() == pid.to_string()))
                {
                    return true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// A `sleep 30` in the cgroup that got pid `want` (the next pid set through ns_last_pid), or
/// None if another process took it first.
fn spawn_at_pid(cg: &TestCgroup, want: u32) -> Option<std::process::Child> {
    for _ in 0..5 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (want - 1).to_string()).ok()?;
        let mut c = cg.command("sleep").arg("30").spawn().unwrap();
        if c.id() == want {
            return Some(c);
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    None
}

/// Case 7. Attack: `grant request --pid P` for a target that exits while the request is on
/// its way, its pid reused (forced through ns_last_pid, 60 times, within the same clock tick,
/// so even the start time matches) before the daemon looks (it is stopped meanwhile).
/// Fixed: the CLI pins the target with a pidfd at once and sends it with the request
/// (SCM_RIGHTS); the daemon finds that process gone and refuses, naming it; the reuser never
/// gets a grant. A second loop races real exits against the CLI: every grant it issues is
/// bound to the target's own start time.
#[test]
fn a_reused_pid_never_receives_a_grant_meant_for_an_exited_target() {
    if !root_or_skip("a_reused_pid_never_receives_a_grant_meant_for_an_exited_target") {
        return;
    }
    let cg = TestCgroup::new("pid-reuse");
    let d = two_uid_daemon(&cg, "mint_rate_per_second = 0\n", "");
    let dpid = d.child.as_ref().unwrap().id() as i32;
    let (mut reused, mut misbound, mut same_tick, mut by_pidfd) = (0, 0, 0, 0);
    for _ in 0..60 {
        let mut target = cg.command("sleep").arg("30").spawn().unwrap();
        let pid = target.id();
        let ticks = start_ticks(pid).unwrap();
        unsafe { libc::kill(dpid, libc::SIGSTOP) };
        let cli = Command::new(enforcer_bin())
            .args(["grant", "request", "--intent", "job", "--pid", &pid.to_string(), "--json"])
            .env("ENFORCER_RUNTIME_DIR", d.runtime_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The CLI pins the target (a pidfd shows in its fdinfo) and sends its request (the
        // stopped daemon queues it).
        let pinned = wait_for_pidfd(cli.id(), pid);
        std::thread::sleep(Duration::from_millis(50));
        target.kill().unwrap();
        target.wait().unwrap();
        let reuser = spawn_at_pid(&cg, pid);
        unsafe { libc::kill(dpid, libc::SIGCONT) };
        let out = cli.wait_with_output().unwrap();
        let Some(mut reuser) = reuser else { continue };
        reused += 1;
        same_tick += usize::from(start_ticks(pid) == Some(ticks));
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            // Bound while the target still lived (the stop reached the daemon late): a
            // mis-binding only if the subject is not the target.
            let g: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if g["subject"]["start_ns"].as_u64() != Some(ticks_to_ns(ticks)) {
                misbound += 1;
            }
        } else {
            assert!(
                err.contains("subject_gone") && err.contains(&format!("process {pid} ")),
                "refused, naming the target: {err} (pinned: {pinned})"
            );
            by_pidfd += usize::from(err.contains("pinned by the pidfd it sent"));
        }
        let _ = reuser.kill();
        let _ = reuser.wait();
    }
    eprintln!(
        "pid reuse forced in {reused} of 60 tries ({same_tick} within the same clock tick); \
         {by_pidfd} refused by the pidfd the CLI sent; {misbound} mis-bindings"
    );
    assert_eq!(misbound, 0);
    assert!(
        by_pidfd >= reused / 2,
        "most refusals come from the sent pidfd: {by_pidfd} of {reused}"
    );
    assert!(reused >= 30, "pid reuse could not be forced often enough ({reused} of 60)");
    assert!(active_grants(&d).is_empty(), "no grant bound to any reuser");

    // The CLI, racing targets that exit on their own.
    let (mut granted, mut refused) = (0, 0);
    for i in 0..60 {
        let target = cg.command("sleep").arg(format!("0.0{}", i % 3)).spawn().unwrap();
        let pid = target.id();
        let ticks = start_ticks(pid);
        let out =
            d.cli(&["grant", "request", "--intent", "job", "--pid", &pid.to_string(), "--json"]);
        let mut target = target;
        let _ = target.wait();
        if out.status.success() {
            let g: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let want = ticks.map(ticks_to_ns);
            assert_eq!(g["subject"]["start_ns"].as_u64(), want, "bound to the pinned target: {g}");
            granted += 1;
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(&pid.to_string()), "the refusal names the target {pid}: {err}");
            refused += 1;
        }
    }
    eprintln!("CLI race: {granted} granted to their live target, {refused} refused naming it");
    assert_eq!(granted + refused, 60);
}

/// Case 8. Attack: a flood of allowed connects (a UDP socket connect(2)ed in a loop) with one
/// denied connect by an agent in the middle. Fixed: violations travel on their own ring and
/// are never sampled: the denial is in the outbox (rotated files read too) and reaches a
/// file sink, however many routine events the flood made.
#[test]
fn an_alert_in_a_flood_of_allowed_connects_reaches_the_outbox_and_the_sink() {
    if !root_or_skip("an_alert_in_a_flood_of_allowed_connects_reaches_the_outbox_and_the_sink") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent-py");
    std::fs::copy(python(), &agent).unwrap();
    let sink = dir.path().join("alerts.jsonl");
    let (ok_port, bad_port) = (tcp_listener(), tcp_listener());
    let policy = format!(
        "mode = \"enforce\"\n\
         [[intent]]\nname = \"job\"\nagents = [{{ uid = 0 }}]\n\
         destinations = [\"127.0.0.1/32:{ok_port}\"]\non_violation = \"deny\"\n\
         [[agent]]\nexe = \"{}\"\n\
         [[sink]]\nname = \"file\"\ntype = \"file\"\npath = \"{}\"\n\
         verdicts = [\"no_grant\", \"expired\", \"revoked\", \"out_of_intent\"]\n\
         [outbox]\nrotate_bytes = 4194304\nmax_backups = 64\n",
        agent.display(),
        sink.display()
    );
    let cg = TestCgroup::new("alert-flood");
    let d = Daemon::start(&cg, &policy);
    let flood = cg
        .command(helper_bin())
        .args(["udp-connect-flood", "127.0.0.1", &ok_port.to_string(), "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let script = format!(
        "import errno, os, socket\ntry:\n    socket.create_connection(('127.0.0.1', {bad_port}), timeout=3).close(); print('ok', os.getpid())\nexcept OSError as e:\n    print(errno.errorcode.get(e.errno), os.getpid())\n"
    );
    let out = cg.command(&agent).args(["-c", &script]).output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (verdict, pid) = line.split_once(' ').unwrap();
    assert_eq!(verdict, "EPERM", "the agent's connect outside its intent is denied");
    let pid: u32 = pid.parse().unwrap();
    let fout = flood.wait_with_output().unwrap();
    eprintln!("flood: {}", String::from_utf8_lossy(&fout.stderr).trim());
    let denied = |e: &Event| e.kind == "connect" && e.process.pid == pid && e.action == "denied";
    let t0 = Instant::now();
    let (found, stored) = loop {
        let all = all_events(&d);
        let found = all.iter().filter(|e| denied(e)).count();
        if found > 0 || t0.elapsed() > Duration::from_secs(60) {
            break (found, all.len());
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let st = d.status_json();
    eprintln!(
        "alert stored {:?} after the flood; {stored} events stored; kernel {}; counts {}",
        t0.elapsed(),
        st["kernel"],
        st["counts"]
    );
    assert_eq!(found, 1, "exactly one stored denial for pid {pid}");
    let t1 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&sink).unwrap_or_default();
        let delivered = parse_events(&text).iter().filter(|e| denied(e)).count();
        if delivered == 1 {
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(60), "the denial never reached the file sink");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// (VmRSS in KiB, open fds) of a process.
fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    (rss, std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count())
}

/// Soak (bounded to about 40 s): an exec storm whose every process carries a differently named
/// credential-shaped variable and opens the secret (so it lives until the daemon answers and
/// its environment is read: every read reports a new credential), a flood of API requests on
/// fresh connections, and a storm of secret opens, all at once. The daemon's RSS and fd count
/// stay flat after the warm-up.
#[test]
fn soak_exec_api_and_open_storms_keep_rss_and_fds_flat() {
    if !root_or_skip("soak_exec_api_and_open_storms_keep_rss_and_fds_flat") {
        return;
    }
    let (_sdir, secret) = secret_file("token", "s3cr3t-value\n");
    let cg = TestCgroup::new("soak");
    let port = tcp_listener();
    let d = Daemon::start(
        &cg,
        &format!(
            "{}[[intent]]\nname = \"job\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"token\"]\n\
             destinations = [\"127.0.0.1/32:{port}\"]\n[outbox]\nrotate_bytes = 1048576\n",
            secret_toml("token", &secret)
        ),
    );
    let dpid = d.child.as_ref().unwrap().id();
    let secs = 36;
    let execs = cg
        .command("sh")
        .args([
            "-c",
            &format!(
                "end=$(($(date +%s) + {secs})); i=0; while [ $(date +%s) -lt $end ]; do \
                 i=$((i+1)); env STORM_${{i}}_TOKEN=ghp_$(printf '%036d' $i) cat '{}' >/dev/null; \
                 done; echo $i",
                secret
            ),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = d.runtime_dir().join("mint.sock").display().to_string();
    let api = cg
        .command(python())
        .args([
            "-c",
            &format!(
                r#"
import socket, time
end = time.time() + {secs}; n = 0
while time.time() < end:
    s = socket.socket(socket.AF_UNIX); s.connect({sock:?})
    if n % 2:
        b = b'{{"intent": "job", "ttl": "2s"}}'
        s.sendall(b'POST /v1/grants HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n' % len(b) + b)
    else:
        s.sendall(b'GET /v1/grants?state=active HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
    while s.recv(65536): pass
    s.close(); n += 1
print(n)
"#
            ),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let opens = cg
        .command(python())
        .args([
            "-c",
            &format!(
                "import os, time\nend = time.time() + {secs}; n = 0\nwhile time.time() < end:\n    \
                 os.close(os.open({secret:?}, os.O_RDONLY)); n += 1\nprint(n)\n"
            ),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut samples = Vec::new();
    let mut tables = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(4));
        samples.push((t0.elapsed().as_secs(), rss_and_fds(dpid)));
        tables.push(d.status_json()["memory"].to_string());
    }
    let count = |c: std::process::Child| {
        String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).trim().to_string()
    };
    let (n_exec, n_api, n_open) = (count(execs), count(api), count(opens));
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_and_fds(dpid);
    eprintln!(
        "soak {secs} s: {n_exec} execs, {n_api} API requests, {n_open} secret opens; \
         (s, (RSS KiB, fds)): {samples:?}; 2 s after: {after:?}; status counts {}; \
         the daemon's tables at each sample: {tables:#?}",
        d.status_json()["counts"]
    );
    assert!(d.status_ok(), "daemon alive");
    // Flat after warm-up: every later sample within 3 MiB of the one at ~12 s. By then the
    // process table holds a full grace period (every process of the last 10 s, boxed, a few
    // hundred bytes each: 1-3 MiB at this exec rate) and the heap has its working size; the
    // daemon's other tables are bounded and compact (`status` `memory`, printed above). A
    // leak of a kilobyte per exec or request grows it by more than that in 24 s; the build
    // before the tables were compacted grew 4.5 MiB here (a process table whose buckets held
    // whole entries: each capacity doubling added megabytes; and three strings per reported
    // environment credential).
    let warm = samples[2].1;
    for (_, (rss, fds)) in &samples[3..] {
        assert!(*rss <= warm.0 + 3072, "RSS grew: {samples:?}");
        assert!(*fds <= warm.1 + 16, "fds grew: {samples:?}");
    }
    // Alert facts (ancestry, exe hash) are kept for running processes only: the storm's
    // thousands of alerting processes have exited (an entry written after a process's exit
    // record once stayed until the table's cap).
    let memory = d.status_json()["memory"].clone();
    let alert_facts = memory["alert_facts"].as_u64().unwrap();
    assert!(alert_facts <= 16, "alert facts of exited processes kept: {memory}");
    assert!(after.1 <= warm.1 + 16, "fds after the soak: {after:?} vs {warm:?}");
    assert!(after.0 <= warm.0 + 3072, "RSS after the soak: {after:?} vs {warm:?}");
}
