//! One daemon per runtime dir: an exclusive flock on `<runtime_dir>/enforcer.pid`, held
//! for the daemon's life and released by the kernel even on SIGKILL.
use std::fs::OpenOptions;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};

pub fn acquire(runtime_dir: &Path) -> Result<Flock<std::fs::File>> {
    let path = runtime_dir.join("enforcer.pid");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0)?;
            lock.rewind()?;
            writeln!(lock, "{}", std::process::id())?;
            Ok(lock)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            bail!(
                "another enforcer daemon is running (pid {}, lock {}); refusing to start a second one",
                pid.trim(),
                path.display()
            )
        }
        Err((_, e)) => bail!("lock {}: {e}", path.display()),
    }
}
