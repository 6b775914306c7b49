//! Attacks on secret-file watching: a secret is its inode for as long as the inode lives
//! (renamed away, hard-linked, kept open, replaced at its path by a newer file), and a new
//! inode at a secret's path is judged from its very first open (no window after an atomic
//! replace). Each attacker procedure runs in the test cgroup, enforce and monitor mode.
use std::path::Path;
use std::time::{Duration, Instant};

use enforcer_tests::enforce_fixture::file_attacks::{
    READ_200, RENAME_AWAY, REPLACE_THEN_READ, rotate_until,
};
use enforcer_tests::enforce_fixture::{Fixture, fixture, py_run};
use enforcer_tests::*;

/// The file_open events of `pid`, waiting (up to 20 s) until there are `n`.
fn wait_opens(f: &Fixture, pid: u32, n: usize) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got: Vec<Event> = f.daemon.events().into_iter().filter(by("file_open", pid)).collect();
        if got.len() >= n || Instant::now() > deadline {
            // Settle, so that extra events would show.
            std::thread::sleep(Duration::from_millis(300));
            return f.daemon.events().into_iter().filter(by("file_open", pid)).collect();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The output lines of a snippet that prints its pid last: (pid, the lines before).
fn with_pid(out: Vec<String>) -> (u32, Vec<String>) {
    let mut out = out;
    let pid = out.pop().expect("no output").parse().expect("pid last");
    (pid, out)
}

/// One file_open of `pid`: the secret `key` by `path`, judged `no_grant`, with `action`.
fn assert_judged(f: &Fixture, pid: u32, path: &str, ino: u64, action: &str) -> Event {
    let e = f.daemon.one_event("file_open", by("file_open", pid));
    assert_required_fields(&e);
    assert_eq!(e.file().secret, "key", "{e:?}");
    assert_eq!(e.file().path, path, "{e:?}");
    assert_eq!(e.file().ino, ino, "{e:?}");
    assert_eq!(e.verdict, "no_grant", "{e:?}");
    assert_eq!(e.action, action, "{e:?}");
    e
}

fn ino(path: &str) -> u64 {
    dev_ino(Path::new(path)).1
}

#[test]
fn rename_away_then_read_is_denied() {
    let Some(f) = fixture("af-rename", "enforce", "") else { return };
    let old = ino(&f.secret);
    let (pid, out) = with_pid(py_run(&f, None, RENAME_AWAY).1);
    assert_eq!(out, ["EPERM"]);
    let away = f.dir.path().join("renamed.txt").display().to_string();
    assert_judged(&f, pid, &away, old, "denied");
    // Renamed back: still the secret.
    let (_, out) = py_run(&f, None, "read()");
    assert_eq!(out, ["EPERM"]);
}

#[test]
fn rename_away_then_read_alerts_in_monitor_mode() {
    let Some(f) = fixture("af-rename-mon", "monitor", "") else { return };
    let old = ino(&f.secret);
    let (pid, out) = with_pid(py_run(&f, None, RENAME_AWAY).1);
    assert_eq!(out, ["ok"]);
    let away = f.dir.path().join("renamed.txt").display().to_string();
    assert_judged(&f, pid, &away, old, "alerted");
}

#[test]
fn rename_into_another_directory_is_still_the_secret() {
    let Some(f) = fixture("af-rename-out", "enforce", "") else { return };
    let other = tempfile::tempdir().unwrap();
    let away = other.path().join("innocent.txt").display().to_string();
    let old = ino(&f.secret);
    let body = format!(
        "os.rename(SECRET, {away:?})\nreport(lambda: open({away:?}).read())\nprint(os.getpid())"
    );
    let (pid, out) = with_pid(py_run(&f, None, &body).1);
    assert_eq!(out, ["EPERM"]);
    assert_judged(&f, pid, &away, old, "denied");
    // The grant holder still reads it under its new name.
    let body = format!("report(lambda: open({away:?}).read())");
    assert_eq!(py_run(&f, Some("strict"), &body).1, ["ok"]);
}

const HARD_LINK: &str = "
os.link(SECRET, LINK)
report(lambda: open(LINK).read())
print(os.getpid())
";

#[test]
fn hard_link_made_after_start_is_denied() {
    for mode in ["enforce", "monitor"] {
        let Some(f) = fixture(&format!("af-link-{mode}"), mode, "") else { return };
        let other = tempfile::tempdir().unwrap();
        let link = other.path().join("copy").display().to_string();
        let body = HARD_LINK.replace("LINK", &format!("{link:?}"));
        let (pid, out) = with_pid(py_run(&f, None, &body).1);
        let (want, action) =
            if mode == "enforce" { ("EPERM", "denied") } else { ("ok", "alerted") };
        assert_eq!(out, [want], "{mode}");
        assert_judged(&f, pid, &link, ino(&f.secret), action);
    }
}

#[test]
fn atomic_replace_then_read_is_denied_every_time() {
    let Some(f) = fixture("af-replace", "enforce", "") else { return };
    let (pid, out) = with_pid(py_run(&f, None, REPLACE_THEN_READ).1);
    assert_eq!(out, ["200 0"], "every read of a freshly replaced secret is judged");
    let ev = wait_opens(&f, pid, 200);
    assert_eq!(ev.len(), 200, "one event per read, none for the temp files");
    assert!(ev.iter().all(|e| e.file().secret == "key"
        && e.file().path == f.secret
        && e.action == "denied"
        && e.verdict == "no_grant"));
    // Each read was of a different (new) inode.
    let inodes: std::collections::HashSet<u64> = ev.iter().map(|e| e.file().ino).collect();
    assert!(inodes.len() > 1, "{inodes:?}");
}

#[test]
fn atomic_replace_then_read_alerts_every_time_in_monitor_mode() {
    let Some(f) = fixture("af-replace-mon", "monitor", "") else { return };
    let (pid, out) = with_pid(py_run(&f, None, REPLACE_THEN_READ).1);
    assert_eq!(out, ["0 200"]);
    let ev = wait_opens(&f, pid, 200);
    assert_eq!(ev.len(), 200, "an event for each read of the new content");
    assert!(ev.iter().all(|e| e.file().secret == "key" && e.action == "alerted"));
}

/// The rotation by another process (outside the cgroup) racing a reader in the cgroup.
#[test]
fn concurrent_rotation_never_leaves_a_window() {
    for mode in ["enforce", "monitor"] {
        let Some(f) = fixture(&format!("af-race-{mode}"), mode, "") else { return };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = rotate_until(f.secret.clone(), stop.clone());
        let (pid, out) = with_pid(py_run(&f, None, READ_200).1);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rotations = writer.join().unwrap();
        assert!(rotations > 0);
        let want = if mode == "enforce" { "0 200" } else { "200 0" };
        assert_eq!(out, [want], "{mode}: {rotations} rotations during the reads");
        let ev = wait_opens(&f, pid, 200);
        assert_eq!(ev.len(), 200, "{mode}: every read judged");
        assert!(ev.iter().all(|e| e.file().secret == "key"));
    }
}

#[test]
fn old_inode_renamed_away_or_kept_open_stays_the_secret() {
    let Some(f) = fixture("af-old", "enforce", "") else { return };
    let old = ino(&f.secret);
    let keep = f.dir.path().join("kept.json").display().to_string();
    // The attacker keeps the old inode under another name; the tool rotates the secret.
    let (_, out) = py_run(&f, None, &format!("os.link(SECRET, {keep:?}); print('linked')"));
    assert_eq!(out, ["linked"]);
    // Another old inode held open (outside the cgroup) while the path is replaced twice.
    let held = std::fs::File::open(&f.secret).unwrap();
    for n in 0..2 {
        let tmp = format!("{}.tmp", f.secret);
        std::fs::write(&tmp, format!("rotated-{n}")).unwrap();
        std::fs::rename(&tmp, &f.secret).unwrap();
    }
    assert_ne!(ino(&f.secret), old);
    std::thread::sleep(Duration::from_millis(1500)); // a sweep or two: nothing is forgotten
    let (pid, out) = with_pid(
        py_run(&f, None, &format!("report(lambda: open({keep:?}).read())\nprint(os.getpid())")).1,
    );
    assert_eq!(out, ["EPERM"], "the old inode under its kept name");
    assert_judged(&f, pid, &keep, old, "denied");
    // Through the holder's fd: /proc/<pid>/fd/<n> reaches the old inode.
    use std::os::fd::AsRawFd;
    let via = format!("/proc/{}/fd/{}", std::process::id(), held.as_raw_fd());
    let (pid, out) = with_pid(
        py_run(&f, None, &format!("report(lambda: open({via:?}).read())\nprint(os.getpid())")).1,
    );
    assert_eq!(out, ["EPERM"], "the old inode through a kept fd");
    let e = f.daemon.one_event("file_open", by("file_open", pid));
    assert_eq!((e.file().secret.as_str(), e.file().ino, e.action.as_str()), ("key", old, "denied"));
    // The new inode at the path too.
    assert_eq!(py_run(&f, None, "read()").1, ["EPERM"]);
    drop(held);
}

#[test]
fn non_secret_files_in_the_secret_directory_open_freely() {
    let Some(f) = fixture("af-sibling", "enforce", "") else { return };
    let other = f.dir.path().join("readme.txt");
    std::fs::write(&other, "hello").unwrap();
    let body = format!(
        "report(lambda: open({o:?}).read())\nreport(lambda: open({n:?}, 'w').write('x'))\nprint(os.getpid())",
        o = other.display().to_string(),
        n = f.dir.path().join("new-file").display().to_string(),
    );
    let (pid, out) = with_pid(py_run(&f, None, &body).1);
    assert_eq!(out, ["ok", "ok"]);
    // A marker open proves the daemon handled everything before it.
    let (marker, _) = with_pid(py_run(&f, None, "read()\nprint(os.getpid())").1);
    f.daemon.one_event("marker", by("file_open", marker));
    assert!(
        !f.daemon.events().iter().any(|e| e.process.pid == pid),
        "no event for non-secret files:\n{}",
        f.daemon.dump()
    );
}

#[test]
fn renamed_secret_stays_watched_across_a_policy_reload() {
    let Some(f) = fixture("af-reload", "enforce", "") else { return };
    let other = tempfile::tempdir().unwrap();
    let away = other.path().join("moved.json").display().to_string();
    std::fs::rename(&f.secret, &away).unwrap();
    let out = f.daemon.cli(&["policy", "reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let body = format!("report(lambda: open({away:?}).read())");
    assert_eq!(py_run(&f, None, &body).1, ["EPERM"], "same policy: still the secret");
    // A policy without the secret: the moved inode is an ordinary file again.
    let cfg = std::fs::read_to_string(&f.daemon.config).unwrap();
    let head = &cfg[..cfg.find("[[secret]]").unwrap()];
    let only_other = format!("{head}{}", secret_toml("other", &format!("{}.other", f.secret)));
    std::fs::write(&f.daemon.config, only_other).unwrap();
    let out = f.daemon.cli(&["policy", "reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(py_run(&f, None, &body).1, ["ok"], "secret removed: an ordinary file again");
}

/// The cost on the opener's path of a marked directory: a loop of opens of a non-secret
/// file next to the secret, with the agent running and after it stopped.
#[test]
fn sibling_open_cost() {
    let Some(mut f) = fixture("af-cost", "monitor", "") else { return };
    let other = f.dir.path().join("readme.txt").display().to_string();
    std::fs::write(&other, "hello").unwrap();
    let body = format!(
        "import time\nt = time.perf_counter()\nfor i in range(20000):\n    os.close(os.open({other:?}, os.O_RDONLY))\nprint(int((time.perf_counter() - t) / 20000 * 1e9))"
    );
    let run = |f: &Fixture| -> u64 {
        let (_, out) = py_run(f, None, &body);
        out[0].parse().unwrap()
    };
    let mut with = Vec::new();
    for _ in 0..3 {
        with.push(run(&f));
    }
    assert!(f.daemon.stop().success());
    let mut without = Vec::new();
    for _ in 0..3 {
        without.push(run(&f));
    }
    with.sort_unstable();
    without.sort_unstable();
    let (w, wo) = (with[1], without[1]);
    eprintln!(
        "sibling open: {w} ns with the agent, {wo} ns without (median of 3 x 20000): ratio {:.2}",
        w as f64 / wo as f64
    );
    assert!(w > 0 && wo > 0);
}
