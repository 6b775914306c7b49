//! The BPF-LSM secret-file backend (enforcer-ebpf/src/lsm.rs), userspace side: loading and
//! attaching `lsm/file_open`, the maps that name the secrets to it (by inode, and by parent
//! directory inode + file name), its scope (cgroup_root, the daemon itself), and the
//! kernel's naming of an inode.
//!
//! Device numbers: the program reads `inode->i_sb->s_dev` (the kernel's MKDEV encoding,
//! major << 20 | minor), while stat(2) reports st_dev in the userspace encoding
//! (new_encode_dev: minor bits above 8 go to bits 20+), and on btrfs subvolumes st_dev is
//! even another (anonymous) device than the superblock's. So the key is taken from
//! /proc/self/mountinfo (which prints the superblock's s_dev) for the file's mount
//! (statx STATX_MNT_ID), falling back to re-encoding st_dev.
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use anyhow::{Context, Result};
use aya::{
    Btf, Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData},
    programs::{Lsm, links::FdLink},
};
use enforcer_common::{InodeKey, NAME_LEN, NameKey, SecretRef, lsm_config};

use super::btf::KernelBtf;

/// The program's name in the object (and its link's pin name).
pub const PROGRAM: &str = "file_open";
/// The program that drops a deleted secret's inode from SECRET_INODES when the kernel frees
/// the inode (`lsm/inode_free_security`), so a recycled inode number is not the secret.
pub const FREE_PROGRAM: &str = "inode_free";

/// Loads and attaches `lsm/file_open`, then `lsm/inode_free_security`; the links to pin
/// (program name, link). Fails where the kernel refuses BPF-LSM (no `bpf` in the active LSM
/// list, no BTF, ...), with the kernel's answer. A kernel that takes `file_open` but refuses
/// the free hook keeps the first (logged: a recycled inode number of a deleted secret then
/// stays judged as the secret until the daemon notices the inode is gone).
pub fn attach(ebpf: &mut Ebpf, btf: &KernelBtf) -> Result<Vec<(&'static str, FdLink)>> {
    let btf = btf.aya()?;
    let mut links = vec![(PROGRAM, attach_one(ebpf, PROGRAM, "file_open", btf)?)];
    match attach_one(ebpf, FREE_PROGRAM, "inode_free_security", btf) {
        Ok(link) => links.push((FREE_PROGRAM, link)),
        Err(e) => tracing::warn!(
            error = %format!("{e:#}"),
            "lsm/inode_free_security refused: a deleted secret's inode number stays judged as the secret until the daemon notices"
        ),
    }
    Ok(links)
}

fn attach_one(ebpf: &mut Ebpf, prog: &str, hook: &str, btf: &Btf) -> Result<FdLink> {
    let p: &mut Lsm = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing from the eBPF object"))?
        .try_into()?;
    let start = std::time::Instant::now();
    p.load(hook, btf).with_context(|| format!("load lsm/{hook}"))?;
    let insns = p.info().ok().and_then(|i| i.verified_instruction_count());
    tracing::info!(
        verified_instructions = insns.unwrap_or(0),
        ms = start.elapsed().as_millis() as u64,
        "lsm/{hook} loaded"
    );
    let id = p.attach().with_context(|| format!("attach lsm/{hook}"))?;
    Ok(p.take_link(id)?.into())
}

/// The kernel's identity of the inode `fd` refers to (any fd, O_PATH included).
pub fn kernel_key(fd: BorrowedFd<'_>) -> Option<InodeKey> {
    let st = nix::sys::stat::fstat(fd).ok()?;
    let dev = mount_id(fd)
        .and_then(|id| {
            let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            mountinfo_dev(&text, id)
        })
        .unwrap_or_else(|| kernel_dev(st.st_dev));
    Some(InodeKey { dev, ino: st.st_ino })
}

/// The kernel's MKDEV encoding of a userspace st_dev.
pub fn kernel_dev(st_dev: u64) -> u64 {
    ((libc::major(st_dev) as u64) << 20) | libc::minor(st_dev) as u64
}

/// The userspace (st_dev) encoding of a kernel s_dev, for events.
pub fn user_dev(kernel: u64) -> u64 {
    libc::makedev((kernel >> 20) as u32, (kernel & 0xfffff) as u32)
}

/// The mount id of the mount `fd` is on (statx STATX_MNT_ID, Linux 5.8+).
fn mount_id(fd: BorrowedFd<'_>) -> Option<u64> {
    // SAFETY: statx into a zeroed struct we own; empty path with AT_EMPTY_PATH names the fd.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(fd.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_MNT_ID, &mut stx)
    };
    (rc == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}

/// The superblock device (kernel encoding) of mount `id` in a mountinfo text.
fn mountinfo_dev(text: &str, id: u64) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        if f.next()?.parse::<u64>().ok()? != id {
            return None;
        }
        let (major, minor) = f.nth(1)?.split_once(':')?;
        Some((major.parse::<u64>().ok()? << 20) | minor.parse::<u64>().ok()?)
    })
}

/// What the kernel must know about the watched secrets: inodes, and names in directories.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelSecrets {
    pub inodes: HashMap<InodeKey, String>,
    /// (directory, file name) -> secret.
    pub names: HashMap<(InodeKey, Vec<u8>), String>,
}

/// The LSM program's maps.
pub struct LsmMaps {
    inodes: BpfHashMap<MapData, InodeKey, SecretRef>,
    names: BpfHashMap<MapData, NameKey, SecretRef>,
    dirs: BpfHashMap<MapData, InodeKey, u8>,
    config: Array<MapData, u64>,
    /// Inodes this daemon wrote (removed again when no longer a secret; inodes the kernel
    /// found by name itself are kept while their secret exists).
    written: HashSet<InodeKey>,
}

impl LsmMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name).with_context(|| format!("map {name} missing from the eBPF object"))
        };
        Ok(LsmMaps {
            inodes: BpfHashMap::try_from(take("SECRET_INODES")?)?,
            names: BpfHashMap::try_from(take("SECRET_NAMES")?)?,
            dirs: BpfHashMap::try_from(take("SECRET_DIRS")?)?,
            config: Array::try_from(take("LSM_CONFIG")?)?,
            written: HashSet::new(),
        })
    }

    /// Scope: opens outside `cgroup_root` (id, level below the cgroup2 root; level 0 is
    /// the whole host) and this daemon's own are not judged.
    pub fn set_scope(&mut self, root_id: u64, level: u32) -> Result<()> {
        let me = std::process::id();
        self.config.set(lsm_config::DAEMON_TGID, me as u64, 0)?;
        self.config.set(lsm_config::DAEMON_START_NS, own_start_ticks().unwrap_or(0), 0)?;
        self.config.set(lsm_config::CGROUP_ROOT_ID, root_id, 0)?;
        self.config.set(lsm_config::CGROUP_ROOT_LEVEL, level as u64, 0)?;
        Ok(())
    }

    /// Makes the maps name exactly these secrets: adds first, then removes what no longer
    /// is a secret (an inode the kernel itself found at a watched path stays while its
    /// secret is defined: it may have been renamed away since).
    pub fn sync(&mut self, want: &KernelSecrets, index: &HashMap<String, u32>) -> Result<()> {
        let mut names = HashSet::new();
        let mut dirs = HashSet::new();
        for ((dir, name), secret) in &want.names {
            let Some(i) = index.get(secret) else { continue };
            if name.len() >= NAME_LEN {
                continue; // watched by inode only (documented)
            }
            let mut key = NameKey { dir: *dir, name: [0; NAME_LEN] };
            key.name[..name.len()].copy_from_slice(name);
            let r = SecretRef { index: *i, _pad: 0 };
            if self.names.get(&key, 0).ok() != Some(r) {
                self.names.insert(key, r, 0).context("write SECRET_NAMES")?;
            }
            self.dirs.insert(*dir, 1, 0).context("write SECRET_DIRS")?;
            names.insert(key);
            dirs.insert(*dir);
        }
        for (key, secret) in &want.inodes {
            let Some(i) = index.get(secret) else { continue };
            let r = SecretRef { index: *i, _pad: 0 };
            if self.inodes.get(key, 0).ok() != Some(r) {
                self.inodes.insert(*key, r, 0).context("write SECRET_INODES")?;
            }
        }
        let live: HashSet<u32> = index.values().copied().collect();
        let stale_names: Vec<NameKey> =
            self.names.keys().flatten().filter(|k| !names.contains(k)).collect();
        for k in stale_names {
            let _ = self.names.remove(&k);
        }
        let stale_dirs: Vec<InodeKey> =
            self.dirs.keys().flatten().filter(|k| !dirs.contains(k)).collect();
        for k in stale_dirs {
            let _ = self.dirs.remove(&k);
        }
        let stale: Vec<InodeKey> = self
            .inodes
            .iter()
            .flatten()
            .filter(|(k, r)| {
                !want.inodes.contains_key(k)
                    && (self.written.contains(k) || !live.contains(&r.index))
            })
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            let _ = self.inodes.remove(&k);
        }
        self.written = want.inodes.keys().copied().collect();
        Ok(())
    }

    /// Every inode the kernel judges as a secret now (status, tests).
    pub fn inode_count(&self) -> usize {
        self.inodes.keys().count()
    }
}

/// Whether the pinned SECRET_INODES under `pin_dir` names `key` (tests, and an operator's
/// check with no daemon running).
pub fn pinned_secret_inode(pin_dir: &Path, key: InodeKey) -> Result<bool> {
    let path = pin_dir.join("SECRET_INODES");
    let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    let map: BpfHashMap<MapData, InodeKey, SecretRef> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(data))?;
    match map.get(&key, 0) {
        Ok(_) => Ok(true),
        Err(aya::maps::MapError::KeyNotFound) => Ok(false),
        Err(e) => Err(e).context("read SECRET_INODES"),
    }
}

/// This process's start time in clock ticks since boot (/proc/self/stat field 22), which
/// the program compares with start_boottime / (10^9 / USER_HZ).
fn own_start_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Name bytes for a path's last component, if it has one.
pub fn name_of(path: &Path) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    path.file_name().map(|n| n.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn device_encodings() {
        // 8:1 (sda1), 259:2 (nvme), 0:300 (an anonymous device with a minor above 255,
        // where new_encode_dev and MKDEV differ).
        for (major, minor) in [(8u32, 1u32), (259, 2), (0, 300), (0, 70_000)] {
            let st = libc::makedev(major, minor);
            assert_eq!(kernel_dev(st), ((major as u64) << 20) | minor as u64);
            assert_eq!(user_dev(kernel_dev(st)), st);
        }
    }

    #[test]
    fn mountinfo_device_is_the_superblock_one() {
        let text = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    29 1 259:2 / / rw,relatime - ext4 /dev/nvme0n1p2 rw\n";
        assert_eq!(mountinfo_dev(text, 29), Some((259 << 20) | 2));
        assert_eq!(mountinfo_dev(text, 22), Some(21));
        assert_eq!(mountinfo_dev(text, 7), None);
    }

    /// The key computed here is the one the kernel holds: fanotify's fdinfo prints the
    /// marked inode's `sdev` straight from `inode->i_sb->s_dev`, the field the LSM program
    /// reads. Checked on a tmpfs file (anonymous device) and on the filesystem of /.
    #[test]
    fn kernel_key_matches_the_kernels_s_dev() {
        use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
        let Ok(fan) = Fanotify::init(InitFlags::FAN_CLASS_NOTIF, EventFFlags::O_RDONLY) else {
            eprintln!("SKIP: fanotify needs root here");
            return;
        };
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let tmp = dir.path().join("secret");
        std::fs::write(&tmp, b"x").unwrap();
        for path in [tmp.as_path(), Path::new("/etc/hostname"), Path::new("/usr/bin/env")] {
            let Ok(f) = std::fs::File::open(path) else { continue };
            let key = kernel_key(f.as_fd()).unwrap();
            fan.mark(
                MarkFlags::FAN_MARK_ADD,
                MaskFlags::FAN_CLOSE_WRITE,
                nix::fcntl::AT_FDCWD,
                Some(path),
            )
            .unwrap();
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fan.as_fd().as_raw_fd()))
                    .unwrap();
            let want = format!("ino:{:x} sdev:{:x} ", key.ino, key.dev);
            assert!(info.contains(&want), "{path:?}: {want:?} not in\n{info}");
        }
    }
}
