//! A cgroup created for one test, and commands that join a cgroup between fork and exec.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Numbers test cgroups and pin dirs apart within one test binary.
pub(crate) static SEQ: AtomicU32 = AtomicU32::new(0);

/// The cgroup2 mount point (the daemon's own lookup).
pub fn cgroup2_mount() -> PathBuf {
    enforcer::kernel::cgroup2_mount().expect("a cgroup2 mount")
}

/// A command whose process joins the cgroup directory `cgroup` between fork and exec.
pub fn command_in(cgroup: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let procs = File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", cgroup.display()));
    let mut cmd = Command::new(program);
    unsafe {
        cmd.pre_exec(move || {
            // Only async-signal-safe calls here: write(2) of "0" moves the caller.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr() as *const libc::c_void, 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A cgroup created for one test; processes started through it run inside it. On drop
/// every process left in it is killed and the cgroup removed.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let path = cgroup2_mount().join(format!("enforcer-test-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TestCgroup { path }
    }

    /// The cgroup path as the daemon reports it (relative to the cgroup2 mount).
    pub fn rel(&self) -> String {
        format!("/{}", self.path.strip_prefix(cgroup2_mount()).unwrap().display())
    }

    /// A child cgroup `name` (created; removed with this one).
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        p
    }

    /// A command whose process joins this cgroup between fork and exec.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(&self.path, program)
    }

    /// Runs a command in the cgroup to completion; returns (pid, stdout).
    pub fn run(&self, program: &str, args: &[&str]) -> (u32, String) {
        let child = self
            .command(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (pid, String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // cgroup.kill covers the whole subtree; then child cgroups go first (a cgroup with
        // children cannot be removed), deepest first.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let mut dirs = vec![self.path.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(rd) = std::fs::read_dir(&dirs[i]) {
                dirs.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            i += 1;
        }
        for dir in dirs.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
