//! Secret-file opens, attributed by device + inode through fanotify inode marks.
//!
//! An inode mark sees every open of that inode whatever name reached it: a symlink, a hard
//! link, a relative path, /proc/self/fd/N, openat2 and io_uring all end in the same VFS
//! open. BPF-LSM would also allow inline decisions, but this kind of host refuses it
//! (see `enforcer doctor`), so fanotify is the backend here.
//!
//! Permission events (FAN_OPEN_PERM), in both modes: the opener waits in open() until the
//! daemon answers, so its grants are read from the kernel map while it cannot change them,
//! its taint is recorded before it can connect, and in enforce mode the answer can be
//! FAN_DENY (open fails with EPERM). If the daemon dies, the kernel answers "allow" for it:
//! this backend fails open, and `status` says so.
mod resolve;

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyEvent, FanotifyResponse, InitFlags, MarkFlags, MaskFlags,
    Response,
};

use crate::policy::Secret;
pub use resolve::Target;

/// An open waiting for the daemon's answer.
pub struct PendingOpen {
    pub open: FileOpen,
    event: FanotifyEvent,
    /// When the daemon read the event: decision latency runs from here to the answer.
    pub received: std::time::Instant,
}

/// Decision latencies of permission events (last 4096 samples), for status and bench.
#[derive(Default)]
pub struct Latencies {
    samples: std::collections::VecDeque<u32>,
    pub count: u64,
    pub max_us: u32,
}

impl Latencies {
    pub fn record(&mut self, d: std::time::Duration) {
        let us = d.as_micros().min(u32::MAX as u128) as u32;
        if self.samples.len() == 4096 {
            self.samples.pop_front();
        }
        self.samples.push_back(us);
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    /// (p50, p99) in microseconds over the recent samples.
    pub fn percentiles(&self) -> (u32, u32) {
        let mut v: Vec<u32> = self.samples.iter().copied().collect();
        if v.is_empty() {
            return (0, 0);
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
        (at(0.50), at(0.99))
    }
}

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
    /// Parent directories of secret paths: a file created, renamed or deleted there triggers
    /// an immediate re-resolution (the 1 s sweep is the fallback), so a replaced secret is
    /// re-marked within milliseconds.
    dirs: nix::sys::inotify::Inotify,
    targets: Vec<Target>,
    by_inode: HashMap<(u64, u64), String>,
    warned_missing: HashSet<PathBuf>,
    /// fanotify queue overflows (events lost); stays 0 with FAN_UNLIMITED_QUEUE.
    pub overflows: u64,
    pub latencies: Latencies,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct WatchStats {
    pub paths_watched: usize,
    pub paths_missing: usize,
}

impl SecretWatch {
    pub fn new() -> Result<Self> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT
                | InitFlags::FAN_CLOEXEC
                | InitFlags::FAN_NONBLOCK
                | InitFlags::FAN_UNLIMITED_QUEUE,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .context("fanotify_init (secret-file backend)")?;
        let dirs = nix::sys::inotify::Inotify::init(
            nix::sys::inotify::InitFlags::IN_NONBLOCK | nix::sys::inotify::InitFlags::IN_CLOEXEC,
        )
        .context("inotify_init (secret directories)")?;
        Ok(SecretWatch {
            fan,
            dirs,
            targets: Vec::new(),
            by_inode: HashMap::new(),
            warned_missing: HashSet::new(),
            overflows: 0,
            latencies: Latencies::default(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fan.as_fd()
    }

    /// Replaces the watched set: drops every mark, then resolves and marks each path.
    pub fn set_secrets(&mut self, secrets: &[Secret]) {
        let _ = self.fan.mark(
            MarkFlags::FAN_MARK_FLUSH,
            MaskFlags::empty(),
            nix::fcntl::AT_FDCWD,
            None::<&str>,
        );
        self.by_inode.clear();
        self.targets = resolve::targets(secrets);
        let parents: HashSet<PathBuf> =
            self.targets.iter().filter_map(|t| t.path.parent().map(PathBuf::from)).collect();
        use nix::sys::inotify::AddWatchFlags as W;
        for dir in parents {
            // Missing directories are covered by the periodic sweep.
            let _ = self.dirs.add_watch(
                &dir,
                W::IN_CREATE | W::IN_MOVED_TO | W::IN_MOVED_FROM | W::IN_DELETE | W::IN_ONLYDIR,
            );
        }
        self.refresh();
    }

    /// The inotify fd to poll: readable when a secret's directory changed.
    pub fn dir_fd(&self) -> BorrowedFd<'_> {
        self.dirs.as_fd()
    }

    /// Drains directory-change notifications; true when something changed.
    pub fn dirs_changed(&mut self) -> bool {
        let mut any = false;
        while let Ok(ev) = self.dirs.read_events() {
            if ev.is_empty() {
                break;
            }
            any = true;
        }
        any
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
                    match self.fan.mark(
                        MarkFlags::FAN_MARK_ADD,
                        MaskFlags::FAN_OPEN_PERM,
                        nix::fcntl::AT_FDCWD,
                        Some(&t.path),
                    ) {
                        Ok(()) => {
                            if t.inode.is_some() || self.warned_missing.remove(&t.path) {
                                tracing::info!(secret = %t.secret, path = %t.path.display(), "secret file (re)appeared; watching its new inode");
                            }
                            self.by_inode.insert(key, t.secret.clone());
                            t.inode = Some(key);
                        }
                        Err(e) => {
                            tracing::warn!(secret = %t.secret, path = %t.path.display(), "cannot watch secret file: {e}")
                        }
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

    /// Reads every queued event (non-blocking). Events that are not a watched secret (a
    /// stale inode) and opens by this daemon are answered "allow" here; the rest wait for
    /// `respond`.
    pub fn read(&mut self) -> Vec<PendingOpen> {
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
                let key = nix::sys::stat::fstat(fd).ok().map(|st| (st.st_dev, st.st_ino));
                let secret = key.and_then(|k| self.by_inode.get(&k).cloned());
                let (Some(key), Some(secret), false) = (key, secret, pid == me) else {
                    self.respond_event(&ev, true);
                    continue;
                };
                let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push(PendingOpen {
                    open: FileOpen { pid, path, dev: key.0, ino: key.1, secret },
                    event: ev,
                    received: std::time::Instant::now(),
                });
            }
        }
    }

    /// Answers a waiting open: allow, or deny (the open fails with EPERM).
    pub fn respond(&mut self, p: PendingOpen, allow: bool) {
        self.respond_event(&p.event, allow);
        self.latencies.record(p.received.elapsed());
    }

    fn respond_event(&self, ev: &FanotifyEvent, allow: bool) {
        let Some(fd) = ev.fd() else { return };
        if !ev.mask().contains(MaskFlags::FAN_OPEN_PERM) {
            return;
        }
        let r = if allow { Response::FAN_ALLOW } else { Response::FAN_DENY };
        if let Err(e) = self.fan.write_response(FanotifyResponse::new(fd, r)) {
            tracing::error!("fanotify response for pid {}: {e}", ev.pid());
        }
    }
}
