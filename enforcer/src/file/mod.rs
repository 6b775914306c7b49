//! Secret-file opens, attributed by inode identity through fanotify marks; and, for the
//! BPF-LSM backend (`kernel/lsm.rs`, chosen where the kernel loads it), the tracking of the
//! secrets' inodes and paths that its maps are filled from (`kernel_secrets`): then the
//! marks only pin the inodes and show when they are gone, and no open waits for the daemon.
//!
//! An inode mark sees every open of that inode whatever name reached it: a symlink, a hard
//! link, a relative path, /proc/self/fd/N, openat2 and io_uring all end in the same VFS
//! open.
//!
//! A secret is its inode, for as long as the inode lives: once an inode is found at a
//! secret's path it keeps that secret's name (and its mark) when it is renamed away, linked
//! elsewhere or replaced at the path by a newer file, until the kernel drops the mark (the
//! inode is gone; checked against the group's fdinfo every sweep). A file handle (inode +
//! generation) tells a recycled inode number from the secret that had it.
//!
//! A replaced secret has no window: each secret's parent directory carries a
//! `FAN_OPEN_PERM | FAN_EVENT_ON_CHILD` mark, so the first open of a new inode at the path
//! is a permission event like any other; it is judged by name (directory + file name ->
//! secret) and its inode is marked from the event's own fd. Opens of other files in those
//! directories are answered "allow" at once, without an event. An event for an inode that is
//! neither a known secret nor a child of a marked directory is never allowed unrecorded: it
//! is judged under `UNMAPPED_SECRET`.
//!
//! A responder thread reads the fanotify queue: it answers those other files (and the
//! daemon's own opens) itself, so they never wait for the daemon's event loop, and hands
//! secret opens over to the daemon through `fd()` / `read()`.
//!
//! Permission events (FAN_OPEN_PERM), in both modes: the opener waits in open() until the
//! daemon answers, so its grants are read from the kernel map while it cannot change them,
//! its taint is recorded before it can connect, and in enforce mode the answer can be
//! FAN_DENY (open fails with EPERM). If the daemon dies, the kernel answers "allow" for it:
//! this backend fails open, and `status` says so.
mod ident;
mod map;
mod resolve;

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyEvent, FanotifyResponse, InitFlags, MarkFlags, MaskFlags,
    Response,
};

use nix::fcntl::OFlag;

use crate::policy::Secret;
use crate::sync::LockOrRecover;
use map::{Class, Known, Map};
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

/// The secret name under which an open of a marked inode that maps to no secret is judged:
/// recorded with an alert (or denied, if the policy covers this name), never let through
/// unrecorded.
pub const UNMAPPED_SECRET: &str = "unmapped-marked-inode";

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct WatchStats {
    pub paths_watched: usize,
    pub paths_missing: usize,
}

pub struct SecretWatch {
    fan: Arc<Fanotify>,
    /// Shared with the responder thread, which reads the fanotify queue, answers opens that
    /// are no secret at once and hands the rest over through `queue`.
    map: Arc<Mutex<Map>>,
    queue: Receiver<PendingOpen>,
    /// Readable when `queue` has opens waiting: the fd the daemon polls.
    wake: OwnedFd,
    /// Parent directories of secret paths: a file created, renamed or deleted there triggers
    /// an immediate re-resolution (the 1 s sweep is the fallback).
    dirs: nix::sys::inotify::Inotify,
    targets: Vec<Target>,
    /// O_PATH fds of the marked directories (to remove a mark; the filesystem for
    /// open_by_handle_at).
    dir_fds: HashMap<(u64, u64), OwnedFd>,
    /// Secrets' directories as the kernel names them, by path (BPF-LSM backend).
    dir_keys: HashMap<PathBuf, enforcer_common::InodeKey>,
    /// BPF-LSM decides opens: no permission marks (see `map::inode_mask`).
    lsm: bool,
    warned_missing: HashSet<PathBuf>,
    /// fanotify queue overflows (events lost); stays 0 with FAN_UNLIMITED_QUEUE.
    pub overflows: u64,
    pub latencies: Latencies,
}

impl SecretWatch {
    /// `lsm`: the BPF-LSM backend decides opens; this only tracks the secrets' inodes and
    /// paths for its maps (`kernel_secrets`).
    pub fn new(lsm: bool) -> Result<Self> {
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
        let (wake, wake_tx) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).context("pipe")?;
        let fan = Arc::new(fan);
        let map = Arc::new(Mutex::new(Map { lsm, ..Map::default() }));
        let (tx, queue) = std::sync::mpsc::channel();
        {
            let (fan, map) = (fan.clone(), map.clone());
            std::thread::Builder::new()
                .name("secret-opens".into())
                .spawn(move || respond_loop(&fan, &map, &tx, &wake_tx))
                .context("spawn the secret-open responder")?;
        }
        Ok(SecretWatch {
            fan,
            map,
            queue,
            wake,
            dirs,
            targets: Vec::new(),
            dir_fds: HashMap::new(),
            dir_keys: HashMap::new(),
            lsm,
            warned_missing: HashSet::new(),
            overflows: 0,
            latencies: Latencies::default(),
        })
    }

    /// The fd to poll: readable when secret opens wait for `read`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Replaces the watched set. Marks are not flushed: an inode whose secret stays in the
    /// policy stays watched (also when it was renamed away), new paths are marked, and only
    /// inodes whose secret is gone, or which sat at a path the policy no longer gives their
    /// secret, lose their marks.
    pub fn set_secrets(&mut self, secrets: &[Secret]) {
        let targets = resolve::targets(secrets);
        let names: HashSet<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
        let kept: HashSet<(&str, &Path)> =
            targets.iter().map(|t| (t.secret.as_str(), t.path.as_path())).collect();
        let mut dropped: HashMap<(u64, u64), Known> = HashMap::new();
        {
            let mut map = self.map.lock_or_recover();
            for t in &self.targets {
                if let Some(key) = t.inode
                    && !kept.contains(&(t.secret.as_str(), t.path.as_path()))
                    && map.by_inode.get(&key).is_some_and(|k| k.secret == t.secret)
                    && let Some(k) = map.by_inode.remove(&key)
                {
                    dropped.insert(key, k);
                }
            }
            let gone: Vec<(u64, u64)> = map
                .by_inode
                .iter()
                .filter(|(_, k)| !names.contains(k.secret.as_str()))
                .map(|(key, _)| *key)
                .collect();
            for key in gone {
                if let Some(k) = map.by_inode.remove(&key) {
                    dropped.insert(key, k);
                }
            }
        }
        // Filesystems to reopen dropped inodes on, before stale directory marks go.
        let mounts: HashMap<u64, OwnedFd> =
            self.dir_fds.iter().filter_map(|(k, fd)| Some((k.0, fd.try_clone().ok()?))).collect();
        self.targets = targets;
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
        // A dropped inode that is still some secret's file was marked again by refresh.
        for (key, k) in dropped {
            if self.map.lock_or_recover().by_inode.contains_key(&key) {
                continue;
            }
            let fd = k
                .handle
                .as_ref()
                .zip(mounts.get(&key.0))
                .and_then(|(h, m)| ident::open_by_handle(m.as_fd(), h));
            let removed = fd.is_some_and(|fd| {
                let p = ident::fd_path(fd.as_fd());
                self.fan
                    .mark(
                        MarkFlags::FAN_MARK_REMOVE,
                        map::inode_mask(self.lsm),
                        nix::fcntl::AT_FDCWD,
                        Some(p.as_str()),
                    )
                    .is_ok()
            });
            if !removed {
                tracing::warn!(secret = %k.secret, ino = key.1, "inode no longer a secret but its mark could not be removed: its opens are judged as {UNMAPPED_SECRET}");
            }
        }
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

    /// Re-resolves every path: marks the parent directories and the files that appeared or
    /// were replaced (new inode); forgets inodes whose marks the kernel dropped. Opens no
    /// file (only O_PATH), so it never waits on a permission event while holding the map.
    pub fn refresh(&mut self) {
        let map = self.map.clone();
        let mut map = map.lock_or_recover();
        self.refresh_dirs(&mut map);
        for i in 0..self.targets.len() {
            let t = &self.targets[i];
            let now = std::fs::metadata(&t.path).ok().map(|m| (m.dev(), m.ino()));
            if now == t.inode && t.checked {
                continue;
            }
            let (secret, path) = (t.secret.clone(), t.path.clone());
            self.targets[i].checked = true;
            // The inode is fixed by the O_PATH open; a replacement after it is the next round's.
            match now.and_then(|_| ident::open_path(&path, false)) {
                Some(fd) => match map.mark_inode(&self.fan, fd.as_fd(), &secret) {
                    Ok(key) => {
                        let t = &mut self.targets[i];
                        if t.inode.is_some() || self.warned_missing.remove(&t.path) {
                            tracing::info!(secret = %t.secret, path = %t.path.display(), "secret file (re)appeared; watching its new inode");
                        }
                        t.inode = Some(key);
                    }
                    Err(e) => {
                        tracing::warn!(secret = %secret, path = %path.display(), "cannot watch secret file: {e}")
                    }
                },
                None => {
                    let t = &mut self.targets[i];
                    t.inode = None;
                    if self.warned_missing.insert(t.path.clone()) && t.explicit {
                        tracing::warn!(secret = %t.secret, path = %t.path.display(), "secret file missing; it will be watched when it appears");
                    }
                }
            }
        }
        self.forget_unmarked(&mut map);
    }

    /// Marks each secret path's parent directory (as configured and with symlinks resolved)
    /// for opens of its children, and drops marks of directories no secret path names.
    fn refresh_dirs(&mut self, map: &mut Map) {
        let mut by_path = HashMap::new();
        let mut want: HashSet<PathBuf> = HashSet::new();
        for t in &self.targets {
            by_path.insert(t.path.clone(), t.secret.clone());
            let (Some(parent), Some(name)) = (t.path.parent(), t.path.file_name()) else {
                continue;
            };
            want.insert(parent.to_path_buf());
            // The kernel names an opened file by its real directory.
            if let Ok(real) = std::fs::canonicalize(parent) {
                by_path.insert(real.join(name), t.secret.clone());
                want.insert(real);
            }
            // A secret path that is itself a symlink: its target's directory too.
            if let Ok(real) = std::fs::canonicalize(&t.path)
                && real != t.path
                && let Some(p) = real.parent()
            {
                want.insert(p.to_path_buf());
                by_path.insert(real, t.secret.clone());
            }
        }
        map.by_path = by_path;
        if self.lsm {
            // The kernel judges new inodes at these paths by (directory, name) itself.
            self.dir_keys = want
                .iter()
                .filter_map(|d| {
                    let fd = ident::open_path(d, true)?;
                    Some((d.clone(), crate::kernel::lsm::kernel_key(fd.as_fd())?))
                })
                .collect();
            map.dirs.clear();
            return;
        }
        let mut live = HashSet::new();
        for dir in want {
            let Ok(m) = std::fs::metadata(&dir) else { continue };
            if self.dir_fds.contains_key(&(m.dev(), m.ino())) {
                live.insert((m.dev(), m.ino()));
                continue;
            }
            let Some(fd) = ident::open_path(&dir, true) else { continue };
            let Some(key) = ident::key_of(fd.as_fd()) else { continue };
            let p = ident::fd_path(fd.as_fd());
            match self.fan.mark(
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_ONLYDIR,
                MaskFlags::FAN_OPEN_PERM | MaskFlags::FAN_EVENT_ON_CHILD,
                nix::fcntl::AT_FDCWD,
                Some(p.as_str()),
            ) {
                Ok(()) => {
                    self.dir_fds.insert(key, fd);
                    live.insert(key);
                }
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), "cannot mark a secret's directory: {e}")
                }
            }
        }
        let stale: Vec<(u64, u64)> =
            self.dir_fds.keys().filter(|k| !live.contains(k)).copied().collect();
        for key in stale {
            if let Some(fd) = self.dir_fds.remove(&key) {
                let p = ident::fd_path(fd.as_fd());
                let _ = self.fan.mark(
                    MarkFlags::FAN_MARK_REMOVE | MarkFlags::FAN_MARK_ONLYDIR,
                    MaskFlags::FAN_OPEN_PERM | MaskFlags::FAN_EVENT_ON_CHILD,
                    nix::fcntl::AT_FDCWD,
                    Some(p.as_str()),
                );
            }
        }
        map.dirs = self.dir_fds.keys().copied().collect();
    }

    /// Forgets inodes the group holds no mark on any more (the inode is gone; its number may
    /// be reused). Compared by inode number only: st_dev and the kernel's s_dev differ on
    /// some filesystems, and keeping an entry longer is harmless (handles tell files apart).
    fn forget_unmarked(&self, map: &mut Map) {
        let at_paths: HashSet<(u64, u64)> = self.targets.iter().filter_map(|t| t.inode).collect();
        if map.by_inode.keys().all(|k| at_paths.contains(k)) {
            return;
        }
        let Some(marked) = ident::marked_inodes(self.fan.as_fd()) else { return };
        let inos: HashSet<u64> = marked.iter().map(|k| k.1).collect();
        map.by_inode.retain(|k, _| at_paths.contains(k) || inos.contains(&k.1));
    }

    /// The secrets as the BPF-LSM program must know them: every inode found as a secret,
    /// and every secret path as (directory inode, file name).
    pub fn kernel_secrets(&self) -> crate::kernel::lsm::KernelSecrets {
        let map = self.map.lock_or_recover();
        let inodes =
            map.by_inode.values().filter_map(|k| Some((k.kernel?, k.secret.clone()))).collect();
        let names = map
            .by_path
            .iter()
            .filter_map(|(path, secret)| {
                let dir = self.dir_keys.get(path.parent()?)?;
                Some(((*dir, crate::kernel::lsm::name_of(path)?), secret.clone()))
            })
            .collect();
        crate::kernel::lsm::KernelSecrets { inodes, names }
    }

    /// Directory inode (kernel naming) -> path, to name the files in kernel records.
    pub fn kernel_dirs(&self) -> HashMap<enforcer_common::InodeKey, PathBuf> {
        let mut out = HashMap::new();
        // The kernel names a file by its real directory: prefer the canonical path.
        for (p, k) in &self.dir_keys {
            let real = std::fs::canonicalize(p).is_ok_and(|r| &r == p);
            if real || !out.contains_key(k) {
                out.insert(*k, p.clone());
            }
        }
        out
    }

    pub fn stats(&self) -> WatchStats {
        WatchStats {
            paths_watched: self.targets.iter().filter(|t| t.inode.is_some()).count(),
            paths_missing: self.targets.iter().filter(|t| t.inode.is_none() && t.explicit).count(),
        }
    }

    /// The secret opens waiting for an answer (non-blocking). Opens by this daemon and of
    /// other files in secrets' directories were answered by the responder thread.
    pub fn read(&mut self) -> Vec<PendingOpen> {
        let mut buf = [0u8; 256];
        while matches!(nix::unistd::read(&self.wake, &mut buf), Ok(n) if n > 0) {}
        self.overflows = self.map.lock_or_recover().overflows;
        self.queue.try_iter().collect()
    }

    /// Answers a waiting open: allow, or deny (the open fails with EPERM).
    pub fn respond(&mut self, p: PendingOpen, allow: bool) {
        respond_event(&self.fan, &p.event, allow);
        self.latencies.record(p.received.elapsed());
    }

    /// Opens of other files in secrets' directories answered at once, and opens of marked
    /// inodes no secret maps to.
    pub fn pass_counts(&self) -> (u64, u64) {
        let map = self.map.lock_or_recover();
        (map.sibling_opens, map.unmapped_opens)
    }
}

/// The responder thread: waits on the fanotify queue, answers "allow" at once for the
/// daemon's own opens and other files in marked directories (they are on the opener's
/// path), and queues secret opens for the daemon's decision. Ends when the daemon's
/// SecretWatch is gone.
fn respond_loop(fan: &Fanotify, map: &Mutex<Map>, tx: &Sender<PendingOpen>, wake: &OwnedFd) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let me = std::process::id();
    loop {
        let mut fds = [PollFd::new(fan.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        let mut queued = false;
        while let Ok(events) = fan.read_events() {
            if events.is_empty() {
                break;
            }
            for ev in events {
                if ev.mask().contains(MaskFlags::FAN_Q_OVERFLOW) {
                    map.lock_or_recover().overflows += 1;
                    continue;
                }
                let Some(fd) = ev.fd() else { continue };
                // Notification marks (BPF-LSM backend) wait for no answer and decide nothing.
                if !ev.mask().contains(MaskFlags::FAN_OPEN_PERM) {
                    continue;
                }
                let pid = ev.pid() as u32;
                let class =
                    if pid == me { Class::Pass } else { map.lock_or_recover().classify(fan, fd) };
                let Class::Judge(key, secret, path) = class else {
                    respond_event(fan, &ev, true);
                    continue;
                };
                let p = PendingOpen {
                    open: FileOpen { pid, path, dev: key.0, ino: key.1, secret },
                    event: ev,
                    received: std::time::Instant::now(),
                };
                if let Err(std::sync::mpsc::SendError(p)) = tx.send(p) {
                    respond_event(fan, &p.event, true);
                    return;
                }
                queued = true;
            }
        }
        if queued {
            let _ = nix::unistd::write(wake, &[1]);
        }
    }
}

fn respond_event(fan: &Fanotify, ev: &FanotifyEvent, allow: bool) {
    let Some(fd) = ev.fd() else { return };
    if !ev.mask().contains(MaskFlags::FAN_OPEN_PERM) {
        return;
    }
    let r = if allow { Response::FAN_ALLOW } else { Response::FAN_DENY };
    if let Err(e) = fan.write_response(FanotifyResponse::new(fd, r)) {
        tracing::error!("fanotify response for pid {}: {e}", ev.pid());
    }
}
