//! Cheap reads of one process's `/proc/<pid>` files for attestation: one `O_PATH` handle on
//! the directory, then each file relative to it (no path walk through `/proc/<pid>` per file)
//! read with one `read` into a stack buffer (std's `read_to_string` adds a `statx` and a
//! second `read` to find the end), and the credentials from the pidfd (`PIDFD_GET_INFO`,
//! Linux 6.13+) instead of rendering `/proc/<pid>/status`, the costliest file of an
//! attestation. Grant issuance attests a process per request, thousands of times a second.
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `/proc/<pid>`, opened once. A handle taken before the pid is reused keeps naming the old
/// process's directory (its reads then fail), never the new one's.
pub struct ProcDir(OwnedFd);

/// An executable's identity for the hash cache: (dev, ino, size, mtime ns).
pub type ExeKey = (u64, u64, u64, i64);

/// Files up to this size are read with one `read`; a larger one (a long cgroup path) falls
/// back to reading until the end.
const SMALL: usize = 1024;

impl ProcDir {
    pub fn open(pid: u32) -> io::Result<ProcDir> {
        let path = CString::new(format!("/proc/{pid}")).expect("no NUL in a number");
        // SAFETY: a valid C string; the fd returned (close-on-exec) is ours.
        let fd = unsafe {
            libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd owned by nobody else.
        Ok(ProcDir(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The whole of a small file (`stat`, `cgroup`, `status`).
    pub fn read(&self, name: &CStr) -> io::Result<String> {
        // SAFETY: a valid dirfd and C string; the fd returned is ours.
        let fd = unsafe {
            libc::openat(self.0.as_raw_fd(), name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut buf = [0u8; SMALL];
        let n = loop {
            // SAFETY: `buf` is valid for `SMALL` bytes.
            let n = unsafe { libc::read(file.as_raw_fd(), buf.as_mut_ptr().cast(), SMALL) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut out = buf[..n].to_vec();
        if n == SMALL {
            // More may follow: read on to the end.
            io::Read::read_to_end(&mut &file, &mut out)?;
        }
        String::from_utf8(out).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
    }

    /// The target of a symlink in the directory (`exe`).
    pub fn readlink(&self, name: &CStr) -> io::Result<String> {
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: `buf` is valid for its length; a valid dirfd and C string.
        let n = unsafe {
            libc::readlinkat(self.0.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// (dev, ino, size, mtime) of the file a magic link (`exe`) leads to.
    pub fn exe_key(&self, name: &CStr) -> io::Result<ExeKey> {
        // SAFETY: an all-zero `stat` is a valid value to be overwritten.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid dirfd, C string and `stat` buffer; flags 0 follow the link.
        if unsafe { libc::fstatat(self.0.as_raw_fd(), name.as_ptr(), &mut st, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((
            st.st_dev,
            st.st_ino,
            st.st_size as u64,
            st.st_mtime_nsec + st.st_mtime * 1_000_000_000,
        ))
    }
}

/// `struct pidfd_info` (include/uapi/linux/pidfd.h), the 64-byte first version.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    spare0: u32,
}

const PIDFD_INFO_CREDS: u64 = 1 << 1;
const PIDFD_INFO_CGROUPID: u64 = 1 << 2;
/// `_IOWR(PIDFS_IOCTL_MAGIC = 0xFF, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: libc::c_ulong = 0xC040_FF0B;

/// What the kernel records about the process a pidfd names (`PIDFD_GET_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidInfo {
    /// Effective ids (the second `Uid:`/`Gid:` column of `/proc/<pid>/status`).
    pub euid: u32,
    pub egid: u32,
    /// The id of its cgroup v2 cgroup (the inode number of the cgroup's directory).
    pub cgroupid: Option<u64>,
}

/// The process's ids and cgroup id. Fails with ESRCH once the process has been reaped (a
/// zombie still answers), and with another error (ENOTTY, EINVAL) where the kernel has no
/// `PIDFD_GET_INFO` (before 6.13).
pub fn pidfd_info(pidfd: &OwnedFd) -> io::Result<PidInfo> {
    const _: () = assert!(std::mem::size_of::<PidfdInfo>() == 64);
    let mut info = PidfdInfo { mask: PIDFD_INFO_CREDS | PIDFD_INFO_CGROUPID, ..Default::default() };
    // SAFETY: `info` is a valid, writable 64-byte pidfd_info as the ioctl's size says.
    let rc = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &mut info) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if info.mask & PIDFD_INFO_CREDS == 0 {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    Ok(PidInfo {
        euid: info.euid,
        egid: info.egid,
        cgroupid: (info.mask & PIDFD_INFO_CGROUPID != 0).then_some(info.cgroupid),
    })
}

/// The effective uid and gid of the process `pidfd` names, from the kernel's own record of
/// it (what `/proc/<pid>/status` shows as the second `Uid:`/`Gid:` column), or None where the
/// kernel has no `PIDFD_GET_INFO` (before 6.13) or the process has exited.
pub fn pidfd_ids(pidfd: &OwnedFd) -> Option<(u32, u32)> {
    pidfd_info(pidfd).ok().map(|i| (i.euid, i.egid))
}

/// Cgroup paths (as `/proc/<pid>/cgroup` shows them, relative to the cgroup2 mount) by
/// cgroup id. Reading `/proc/<pid>/cgroup` takes the kernel's css_set lock with interrupts
/// off and renders the path: after `stat`, the costliest read of an attestation. An id's
/// path cannot change: cgroup v2 has no rename (rename(2) in the hierarchy fails with EPERM;
/// `cgroup_path_follows_the_process` checks that this kernel still refuses it), cgroup ids
/// are 64-bit and never reused within a boot, and the cgroup of a live process exists.
static CGROUP_PATHS: std::sync::Mutex<Option<std::collections::HashMap<u64, String>>> =
    std::sync::Mutex::new(None);

/// Cached paths at most; then the cache starts again.
const CGROUP_PATHS_MAX: usize = 4096;

/// The path of cgroup `id`: cached, or from `read` (the process's `/proc/<pid>/cgroup`).
pub fn cgroup_path(id: u64, read: impl FnOnce() -> io::Result<String>) -> io::Result<String> {
    let lock = || CGROUP_PATHS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = lock().as_ref().and_then(|m| m.get(&id)) {
        return Ok(p.clone());
    }
    let p = read()?;
    // Empty: no cgroup v2 line (a v1-only host); not cached, so not taken for an answer.
    if !p.is_empty() {
        let mut g = lock();
        let m = g.get_or_insert_with(Default::default);
        if m.len() >= CGROUP_PATHS_MAX {
            m.clear();
        }
        m.insert(id, p.clone());
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// A process running as another uid/gid: the pidfd's ids are its effective ids, as
    /// /proc/<pid>/status shows them; a file longer than one read comes back whole.
    #[test]
    fn ids_and_reads_match_proc() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP ids_and_reads_match_proc: needs root (a child of another uid)");
            return;
        }
        let mut c =
            std::process::Command::new("sleep").arg("30").uid(65534).gid(65533).spawn().unwrap();
        let pid = c.id();
        // SAFETY: plain syscall; the fd returned is ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let dir = ProcDir::open(pid).unwrap();
        // The child may still be starting (its counters change between two reads): compare
        // once two reads in a row agree.
        let mut status = String::new();
        for _ in 0..100 {
            status = dir.read(c"status").unwrap();
            if status == std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(status.len() > SMALL, "status must exercise the long read");
        assert_eq!(status, std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap());
        let col = |k: &str| -> u32 {
            let l = status.lines().find_map(|l| l.strip_prefix(k)).unwrap();
            l.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        assert_eq!((col("Uid:"), col("Gid:")), (65534, 65533));
        match pidfd_ids(&pidfd) {
            Some(ids) => assert_eq!(ids, (65534, 65533)),
            // Before Linux 6.13: attestation reads /proc/<pid>/status instead.
            None => eprintln!("PIDFD_GET_INFO not supported by this kernel"),
        }
        assert_eq!(
            dir.read(c"stat").unwrap(),
            std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap()
        );
        assert_eq!(
            dir.readlink(c"exe").unwrap(),
            std::fs::read_link(format!("/proc/{pid}/exe")).unwrap().to_string_lossy()
        );
        let md = std::fs::metadata(format!("/proc/{pid}/exe")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            dir.exe_key(c"exe").unwrap(),
            (md.dev(), md.ino(), md.size(), md.mtime_nsec() + md.mtime() * 1_000_000_000)
        );
        c.kill().unwrap();
        c.wait().unwrap();
        // Reaped: the handle no longer reads, and the pidfd has no ids to give.
        assert!(dir.read(c"stat").is_err());
        assert_eq!(pidfd_ids(&pidfd), None);
    }

    /// The cgroup path of an attestation is the process's cgroup as it moves between
    /// cgroups, cached or not; and cgroup v2 still refuses rename(2), which the cache of
    /// paths by cgroup id relies on.
    #[test]
    fn cgroup_path_follows_the_process() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP cgroup_path_follows_the_process: needs root (creates cgroups)");
            return;
        }
        let Ok(mount) = crate::kernel::cgroup2_mount() else {
            eprintln!("SKIP cgroup_path_follows_the_process: no cgroup2 mount");
            return;
        };
        let name = |n: &str| format!("enforcer-unit-cgpath-{}-{n}", std::process::id());
        let (a, b) = (mount.join(name("a")), mount.join(name("b")));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let mut c = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let attest = || super::super::attest::attest_pid(c.id()).unwrap().cgroup;
        let mut seen = Vec::new();
        for dir in [&a, &b, &a] {
            std::fs::write(dir.join("cgroup.procs"), c.id().to_string()).unwrap();
            // First read (fills the cache), then from the cache.
            seen.push((attest(), attest()));
        }
        let renamed = std::fs::rename(&a, mount.join(name("c")));
        let r = super::super::attest::attest_pid(c.id()).unwrap();
        let has_id = procdir_info(&r.pidfd).and_then(|i| i.cgroupid).is_some();
        c.kill().unwrap();
        c.wait().unwrap();
        for _ in 0..100 {
            let gone = [&a, &b, &mount.join(name("c"))]
                .iter()
                .all(|d| std::fs::remove_dir(d).is_ok() || !d.exists());
            if gone {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let (pa, pb) = (format!("/{}", name("a")), format!("/{}", name("b")));
        assert_eq!(seen, [(pa.clone(), pa.clone()), (pb.clone(), pb), (pa.clone(), pa)]);
        assert_eq!(
            renamed.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EPERM)),
            "cgroup v2 renamed a cgroup: the cache of paths by cgroup id would go stale"
        );
        if !has_id {
            eprintln!(
                "PIDFD_GET_INFO gives no cgroup id here: /proc/<pid>/cgroup is read each time"
            );
        }
    }

    fn procdir_info(fd: &OwnedFd) -> Option<PidInfo> {
        pidfd_info(fd).ok()
    }
}
