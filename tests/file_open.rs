//! Secret-file opens: every path to the same inode is attributed to the opening process.
use std::path::PathBuf;

use enforcer_tests::*;

struct Fixture {
    cg: TestCgroup,
    daemon: Daemon,
    secret: PathBuf,
    _dir: tempfile::TempDir,
}

fn fixture(name: &str) -> Option<Fixture> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = secret_file("deploy-key.json", "{\"key\": \"not-a-real-secret\"}\n");
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(&cg, &secret_toml("deploy-key", &secret));
    Some(Fixture { cg, daemon, secret: PathBuf::from(secret), _dir: dir })
}

/// The one file_open event of `pid`, checked against the secret's inode.
fn assert_open(f: &Fixture, pid: u32, exe: &str, expect_path: &str) -> Event {
    let e = f.daemon.one_event("file_open", by("file_open", pid));
    assert_required_fields(&e);
    let (dev, ino) = dev_ino(&f.secret);
    assert_eq!(e.file().dev, dev, "{e:?}");
    assert_eq!(e.file().ino, ino, "{e:?}");
    assert_eq!(e.file().secret, "deploy-key");
    assert_eq!(e.file().path, expect_path);
    assert_eq!(e.process.exe, exe);
    assert_eq!(e.process.cgroup, f.cg.rel());
    assert_eq!(e.verdict, "no_grant");
    assert_eq!(e.action, "alerted");
    assert_eq!(e.mode, "monitor");
    assert_eq!(e.mitre, ["T1552.001"]);
    assert_eq!(e.host, "test-host");
    e
}

#[test]
fn direct_open_by_cat() {
    let Some(f) = fixture("direct") else { return };
    let path = f.secret.display().to_string();
    let (pid, _) = f.cg.run("cat", &[&path]);
    let e = assert_open(&f, pid, &which("cat"), &path);
    assert_eq!(e.process.cmdline, format!("cat {path}"));
    assert_eq!(e.process.ppid, std::process::id());
    assert_eq!(e.process.uid, 0);
}

#[test]
fn symlink_is_resolved_to_the_secret() {
    let Some(f) = fixture("symlink") else { return };
    let link = f.secret.with_file_name("innocent-link");
    std::os::unix::fs::symlink(&f.secret, &link).unwrap();
    let (pid, _) = f.cg.run("cat", &[link.to_str().unwrap()]);
    let e = assert_open(&f, pid, &which("cat"), f.secret.to_str().unwrap());
    assert_eq!(e.process.cmdline, format!("cat {}", link.display()));
}

#[test]
fn hard_link_is_the_same_inode() {
    let Some(f) = fixture("hardlink") else { return };
    let link = f.secret.with_file_name("hard-link-copy");
    std::fs::hard_link(&f.secret, &link).unwrap();
    let (pid, _) = f.cg.run("cat", &[link.to_str().unwrap()]);
    // The kernel names the file by the link that was opened; the inode is the secret's.
    assert_open(&f, pid, &which("cat"), link.to_str().unwrap());
}

#[test]
fn relative_path() {
    let Some(f) = fixture("relative") else { return };
    let child =
        f.cg.command("cat")
            .arg("deploy-key.json")
            .current_dir(f.secret.parent().unwrap())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
    let pid = child.id();
    assert!(child.wait_with_output().unwrap().status.success());
    let e = assert_open(&f, pid, &which("cat"), f.secret.to_str().unwrap());
    assert_eq!(e.process.cmdline, "cat deploy-key.json");
}

#[test]
fn proc_self_fd_reopen() {
    let Some(f) = fixture("procfd") else { return };
    // O_PATH gets a handle without opening the file; the re-open through /proc/self/fd is
    // the only real open, and it must be caught.
    let script = format!(
        "import os\nfd = os.open({:?}, os.O_PATH)\nfd2 = os.open('/proc/self/fd/%d' % fd, os.O_RDONLY)\nos.read(fd2, 4)\nprint(os.getpid())\n",
        f.secret.display().to_string()
    );
    let (pid, out) = f.cg.run(&python(), &["-c", &script]);
    assert_eq!(out.trim(), pid.to_string());
    assert_open(&f, pid, &python(), f.secret.to_str().unwrap());
}

#[test]
fn openat2_syscall() {
    let Some(f) = fixture("openat2") else { return };
    let (pid, out) =
        f.cg.run(helper_bin().to_str().unwrap(), &["openat2", f.secret.to_str().unwrap()]);
    assert_eq!(out.trim(), format!("ok {pid}"));
    assert_open(
        &f,
        pid,
        &helper_bin().canonicalize().unwrap().display().to_string(),
        f.secret.to_str().unwrap(),
    );
}

#[test]
fn io_uring_open() {
    let Some(f) = fixture("uring") else { return };
    let (pid, out) =
        f.cg.run(helper_bin().to_str().unwrap(), &["uring-open", f.secret.to_str().unwrap()]);
    assert_eq!(out.trim(), format!("ok {pid}"));
    assert_open(
        &f,
        pid,
        &helper_bin().canonicalize().unwrap().display().to_string(),
        f.secret.to_str().unwrap(),
    );
}

#[test]
fn non_secret_files_and_other_cgroups_are_not_reported() {
    let Some(f) = fixture("noise") else { return };
    let other = f.secret.with_file_name("readme.txt");
    std::fs::write(&other, "hello").unwrap();
    let (pid_other, _) = f.cg.run("cat", &[other.to_str().unwrap()]);
    // The test process itself is outside the watched cgroup.
    let outside = std::process::Command::new("cat")
        .arg(&f.secret)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid_outside = outside.id();
    outside.wait_with_output().unwrap();
    // A marker open from inside proves the daemon processed everything before it.
    let (marker, _) = f.cg.run("cat", &[f.secret.to_str().unwrap()]);
    f.daemon.one_event("marker", by("file_open", marker));
    let events = f.daemon.events();
    assert!(
        !events.iter().any(|e| e.process.pid == pid_other && e.kind == "file_open"),
        "non-secret open reported"
    );
    assert!(
        !events.iter().any(|e| e.process.pid == pid_outside && e.kind == "file_open"),
        "open outside cgroup_root reported"
    );
}

#[test]
fn missing_secret_is_watched_when_it_appears() {
    if !root_or_skip("missing_secret") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("later.key");
    let cg = TestCgroup::new("missing");
    let daemon = Daemon::start(&cg, &secret_toml("later", secret.to_str().unwrap()));
    assert!(
        daemon.log().contains("secret file missing"),
        "no warning for the missing path:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.status_json()["secrets"]["paths_missing"], 1);
    std::fs::write(&secret, "k").unwrap();
    // The daemon re-resolves paths every second; open until it has caught one (bounded).
    let mut caught = None;
    for _ in 0..50 {
        let (pid, _) = cg.run("cat", &[secret.to_str().unwrap()]);
        std::thread::sleep(std::time::Duration::from_millis(100));
        if daemon.events().iter().any(by("file_open", pid)) {
            caught = Some(pid);
            break;
        }
    }
    let pid = caught
        .unwrap_or_else(|| panic!("secret created after start never watched:\n{}", daemon.log()));
    let e = daemon.one_event("file_open", by("file_open", pid));
    assert_eq!(e.file().secret, "later");
    assert_eq!(e.file().ino, dev_ino(&secret).1);
}

#[test]
fn replaced_secret_is_re_resolved() {
    let Some(f) = fixture("replace") else { return };
    let tmp = f.secret.with_file_name("new-version.json");
    std::fs::write(&tmp, "{\"key\": \"rotated\"}\n").unwrap();
    std::fs::rename(&tmp, &f.secret).unwrap();
    let new_ino = dev_ino(&f.secret).1;
    let mut caught = None;
    for _ in 0..50 {
        let (pid, _) = f.cg.run("cat", &[f.secret.to_str().unwrap()]);
        std::thread::sleep(std::time::Duration::from_millis(100));
        if f.daemon.events().iter().any(by("file_open", pid)) {
            caught = Some(pid);
            break;
        }
    }
    let pid = caught.expect("replaced secret never re-watched");
    assert_eq!(f.daemon.one_event("file_open", by("file_open", pid)).file().ino, new_ino);
}
