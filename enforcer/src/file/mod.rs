//! Secret-file opens, attributed by device + inode through fanotify inode marks.
//!
//! An inode mark sees every open of that inode whatever name reached it: a symlink, a hard
//! link, a relative path, /proc/self/fd/N, openat2 and io_uring all end in the same VFS
//! open. BPF-LSM would also allow inline decisions, but this kind of host refuses it
//! (see `enforcer doctor`), so fanotify is the backend here.
mod resolve;

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

use crate::policy::Secret;
pub use resolve::Target;

/// One open of a watched secret.
#[derive(Debug, Clone)]
pub struct FileOpen {
    pub pid: u32,
    /// The name the file was opened by, as the kernel reports it.
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub secret: String,
}

pub struct SecretWatch {
    fan: Fanotify,
    targets: Vec<Target>,
    by_inode: HashMap<(u64, u64), String>,
    warned_missing: HashSet<PathBuf>,
    /// fanotify queue overflows (events lost); stays 0 with FAN_UNLIMITED_QUEUE.
    pub overflows: u64,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct WatchStats {
    pub paths_watched: usize,
    pub paths_missing: usize,
}

impl SecretWatch {
    pub fn new() -> Result<Self> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK | InitFlags::FAN_UNLIMITED_QUEUE,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .context("fanotify_init (secret-file backend)")?;
        Ok(SecretWatch { fan, targets: Vec::new(), by_inode: HashMap::new(), warned_missing: HashSet::new(), overflows: 0 })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fan.as_fd()
    }

    /// Replaces the watched set: drops every mark, then resolves and marks each path.
    pub fn set_secrets(&mut self, secrets: &[Secret]) {
        let _ = self.fan.mark(MarkFlags::FAN_MARK_FLUSH, MaskFlags::empty(), nix::fcntl::AT_FDCWD, None::<&str>);
        self.by_inode.clear();
        self.targets = resolve::targets(secrets);
        self.refresh();
    }

    /// Re-resolves every path: marks files that appeared or were replaced (new inode).
    pub fn refresh(&mut self) {
        for t in &mut self.targets {
            let now = std::fs::metadata(&t.path).ok().map(|m| (m.dev(), m.ino()));
            if now == t.inode && t.checked {
                continue;
            }
            t.checked = true;
            match now {
                Some(key) => {
                    match self.fan.mark(MarkFlags::FAN_MARK_ADD, MaskFlags::FAN_OPEN, nix::fcntl::AT_FDCWD, Some(&t.path)) {
                        Ok(()) => {
                            if t.inode.is_some() || self.warned_missing.remove(&t.path) {
                                tracing::info!(secret = %t.secret, path = %t.path.display(), "secret file (re)appeared; watching its new inode");
                            }
                            self.by_inode.insert(key, t.secret.clone());
                            t.inode = Some(key);
                        }
                        Err(e) => tracing::warn!(secret = %t.secret, path = %t.path.display(), "cannot watch secret file: {e}"),
                    }
                }
                None => {
                    t.inode = None;
                    if self.warned_missing.insert(t.path.clone()) && t.explicit {
                        tracing::warn!(secret = %t.secret, path = %t.path.display(), "secret file missing; it will be watched when it appears");
                    }
                }
            }
        }
        // Forget inodes no path resolves to any more (replaced or deleted files).
        let live: HashSet<(u64, u64)> = self.targets.iter().filter_map(|t| t.inode).collect();
        self.by_inode.retain(|k, _| live.contains(k));
    }

    pub fn stats(&self) -> WatchStats {
        WatchStats {
            paths_watched: self.targets.iter().filter(|t| t.inode.is_some()).count(),
            paths_missing: self.targets.iter().filter(|t| t.inode.is_none() && t.explicit).count(),
        }
    }

    /// Reads every queued event (non-blocking). Opens by this daemon are ignored.
    pub fn read(&mut self) -> Vec<FileOpen> {
        let mut out = Vec::new();
        let me = std::process::id();
        loop {
            let events = match self.fan.read_events() {
                Ok(ev) if !ev.is_empty() => ev,
                _ => return out,
            };
            for ev in events {
                if ev.mask().contains(MaskFlags::FAN_Q_OVERFLOW) {
                    self.overflows += 1;
                    continue;
                }
                let Some(fd) = ev.fd() else { continue };
                let pid = ev.pid() as u32;
                if pid == me {
                    continue;
                }
                let Ok(st) = nix::sys::stat::fstat(fd) else { continue };
                let key = (st.st_dev, st.st_ino);
                let Some(secret) = self.by_inode.get(&key) else { continue };
                let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push(FileOpen { pid, path, dev: key.0, ino: key.1, secret: secret.clone() });
            }
        }
    }
}
