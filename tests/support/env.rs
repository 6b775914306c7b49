//! The binaries under test, programs the tests run, and files they create.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn enforcer_bin() -> PathBuf {
    match std::env::var_os("ENFORCER_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/enforcer"),
    }
}

/// Factor for the harness's waits (daemon ready, events, SIGTERM): `ENFORCER_TEST_TIME_SCALE`,
/// default 1. The kernel matrix sets it in its emulated (TCG) guests, where the verifier alone
/// takes several times longer than on the host.
pub fn time_scale() -> u32 {
    std::env::var("ENFORCER_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=20).contains(n))
        .unwrap_or(1)
}

/// Runs `enforcer ARGS` (no daemon needed) to completion.
pub fn enforcer(args: &[&str]) -> Output {
    Command::new(enforcer_bin()).args(args).output().expect("run enforcer")
}

/// The helper binary cargo builds next to the test binaries (target/<profile>/).
pub fn helper_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    profile_dir.join("enforcer-test-helper")
}

/// True when the kernel programs can be loaded; otherwise prints why the test is skipped.
pub fn root_or_skip(test: &str) -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root (CAP_BPF, CAP_SYS_ADMIN) to load kernel programs");
        return false;
    }
    let bin = enforcer_bin();
    assert!(
        bin.exists(),
        "{} missing: run `cargo xtask test` (it builds the daemon with its eBPF object)",
        bin.display()
    );
    true
}

/// (dev, ino) as the kernel reports them for `path`.
pub fn dev_ino(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.dev(), m.ino())
}

/// Canonical path of a program found on PATH (what the daemon reports as exe).
pub fn which(prog: &str) -> String {
    let out = Command::new("sh").args(["-c", &format!("command -v {prog}")]).output().unwrap();
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::fs::canonicalize(&p)
        .unwrap_or_else(|e| panic!("{prog} not found ({p}): {e}"))
        .display()
        .to_string()
}

/// The python3 interpreter's real path (not a pyenv shim), for commands and exe assertions.
pub fn python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import os, sys; print(os.path.realpath(sys.executable))"])
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A secret file `name` with `content` in a fresh temp dir: (dir guard, path).
pub fn secret_file(name: &str, content: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::Builder::new().prefix("enforcer-secret-").tempdir().unwrap();
    let path = dir.path().join(name).display().to_string();
    std::fs::write(&path, content).unwrap();
    (dir, path)
}

/// A `[[secret]]` table naming one path.
pub fn secret_toml(name: &str, path: &str) -> String {
    format!("[[secret]]\nname = \"{name}\"\npaths = [\"{path}\"]\n")
}
