//! What the responder thread and the daemon share: which inodes and paths are which secret,
//! which directories are marked, and how an opened file is classified.
use std::collections::{HashMap, HashSet};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::fanotify::{Fanotify, MarkFlags, MaskFlags};

use super::{UNMAPPED_SECRET, ident};

/// A marked secret inode: the secret it was found as, and its file handle (None where the
/// filesystem exports none; (dev, ino) alone then identifies it).
pub(super) struct Known {
    pub secret: String,
    pub handle: Option<ident::Handle>,
    /// The inode as the kernel names it (for the BPF-LSM backend's map).
    pub kernel: Option<enforcer_common::InodeKey>,
}

/// An opened file, classified.
pub(super) enum Class {
    /// Opened by the daemon itself, or another file in a marked directory: allow at once.
    Pass,
    /// A secret (or UNMAPPED_SECRET): (dev, ino), secret, the name it was opened by.
    Judge((u64, u64), String, String),
}

#[derive(Default)]
pub(super) struct Map {
    /// Every inode marked as a secret, kept (renamed, linked or replaced at its path) until
    /// the kernel drops its mark.
    pub by_inode: HashMap<(u64, u64), Known>,
    /// Secret paths -> secret, as configured and as the kernel names an opened file (with
    /// the directories' symlinks resolved).
    pub by_path: HashMap<PathBuf, String>,
    /// Inodes of the directories marked FAN_OPEN_PERM | FAN_EVENT_ON_CHILD.
    pub dirs: HashSet<(u64, u64)>,
    pub overflows: u64,
    /// Opens of other files in secrets' directories, answered "allow" at once.
    pub sibling_opens: u64,
    /// Opens of marked inodes no secret maps to, judged under UNMAPPED_SECRET.
    pub unmapped_opens: u64,
    /// The BPF-LSM backend decides opens: inode marks only pin the inode and tell when it
    /// is gone (a notification mask that opens never trigger), no permission events.
    pub lsm: bool,
}

/// The mark mask of a secret inode: permission events for the fanotify backend; with
/// BPF-LSM a mask opens never trigger (the mark keeps the inode's liveness visible in the
/// group's fdinfo).
pub(super) fn inode_mask(lsm: bool) -> MaskFlags {
    if lsm { MaskFlags::FAN_CLOSE_WRITE } else { MaskFlags::FAN_OPEN_PERM }
}

impl Map {
    /// Marks the inode `fd` refers to as `secret`. An inode already known (same handle)
    /// keeps the name it was first found as, for its whole life.
    pub fn mark_inode(
        &mut self,
        fan: &Fanotify,
        fd: BorrowedFd<'_>,
        secret: &str,
    ) -> nix::Result<(u64, u64)> {
        let key = ident::key_of(fd).ok_or(nix::errno::Errno::EBADF)?;
        let p = ident::fd_path(fd);
        fan.mark(
            MarkFlags::FAN_MARK_ADD,
            inode_mask(self.lsm),
            nix::fcntl::AT_FDCWD,
            Some(p.as_str()),
        )?;
        let handle = ident::handle_of(fd);
        match self.by_inode.get(&key) {
            Some(k) if k.handle == handle => {}
            _ => {
                let kernel = crate::kernel::lsm::kernel_key(fd);
                self.by_inode.insert(key, Known { secret: secret.to_string(), handle, kernel });
            }
        }
        Ok(key)
    }

    /// Which secret an opened file is: a known inode, a new inode at a secret's path, or
    /// (Pass) another file in a marked directory. Anything else is UNMAPPED_SECRET.
    pub fn classify(&mut self, fan: &Fanotify, fd: BorrowedFd<'_>) -> Class {
        let key = ident::key_of(fd).unwrap_or_default();
        let known = self.by_inode.get(&key).and_then(|k| {
            (k.handle.is_none() || k.handle == ident::handle_of(fd)).then(|| k.secret.clone())
        });
        let path = std::fs::read_link(ident::fd_path(fd))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(secret) = known {
            return Class::Judge(key, secret, path);
        }
        let name = Path::new(path.strip_suffix(" (deleted)").unwrap_or(&path));
        if let Some(secret) = self.by_path.get(name).cloned() {
            // A new inode at a secret's path (it replaced the old one): judged from this
            // first open, and marked from the event's own fd so every later name is too.
            if let Err(e) = self.mark_inode(fan, fd, &secret) {
                tracing::warn!(secret = %secret, path = %path, "cannot watch a replaced secret's new inode: {e}");
            }
            return Class::Judge(key, secret, path);
        }
        let sibling = name
            .parent()
            .and_then(|d| std::fs::metadata(d).ok())
            .is_some_and(|m| self.dirs.contains(&(m.dev(), m.ino())));
        if sibling {
            self.sibling_opens += 1;
            return Class::Pass;
        }
        self.unmapped_opens += 1;
        tracing::warn!(path = %path, ino = key.1, "open of a marked inode that maps to no secret; judged as {UNMAPPED_SECRET}");
        Class::Judge(key, UNMAPPED_SECRET.to_string(), path)
    }
}
