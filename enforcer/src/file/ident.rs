//! Inode identity beyond (dev, ino): file handles (they carry the inode's generation, so a
//! recycled inode number is a different file), O_PATH opens (which raise no fanotify event,
//! so the daemon never waits on itself), and the set of inodes the kernel holds marks on.
use std::collections::HashSet;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// An exported file handle (`name_to_handle_at`): type and opaque bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handle {
    kind: i32,
    bytes: Vec<u8>,
}

const MAX_HANDLE_BYTES: usize = 128;

/// `struct file_handle` with room for MAX_HANDLE_BYTES.
#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_BYTES],
}

/// The handle of the inode `fd` refers to (any fd, O_PATH included); None where the
/// filesystem cannot export handles.
pub fn handle_of(fd: BorrowedFd<'_>) -> Option<Handle> {
    let mut raw = RawHandle {
        handle_bytes: MAX_HANDLE_BYTES as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_BYTES],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `raw` is a file_handle with room for handle_bytes bytes, the path is an empty
    // NUL-terminated string (AT_EMPTY_PATH: the fd itself), mount_id is a valid int.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut raw as *mut RawHandle,
            &mut mount_id as *mut libc::c_int,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return None;
    }
    let n = (raw.handle_bytes as usize).min(MAX_HANDLE_BYTES);
    Some(Handle { kind: raw.handle_type, bytes: raw.f_handle[..n].to_vec() })
}

/// Opens (O_PATH) the inode `h` names on the filesystem of `mount`; None if it is gone.
pub fn open_by_handle(mount: BorrowedFd<'_>, h: &Handle) -> Option<OwnedFd> {
    if h.bytes.len() > MAX_HANDLE_BYTES {
        return None;
    }
    let mut raw = RawHandle {
        handle_bytes: h.bytes.len() as u32,
        handle_type: h.kind,
        f_handle: [0; MAX_HANDLE_BYTES],
    };
    raw.f_handle[..h.bytes.len()].copy_from_slice(&h.bytes);
    // SAFETY: `raw` is a valid file_handle of handle_bytes bytes; the result is a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            &mut raw as *mut RawHandle,
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An O_PATH fd of `path` (following symlinks): no open of the file itself, so no fanotify
/// event, and the inode it names cannot change under us.
pub fn open_path(path: &Path, dir: bool) -> Option<OwnedFd> {
    let mut flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
    if dir {
        flags |= OFlag::O_DIRECTORY;
    }
    nix::fcntl::open(path, flags, Mode::empty()).ok()
}

/// A path naming exactly the inode of `fd` (the magic link is followed by path lookup).
pub fn fd_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// (dev, ino) of the file `fd` refers to.
pub fn key_of(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(fd).ok().map(|st| (st.st_dev, st.st_ino))
}

/// (dev, ino) of every inode the fanotify group `fan` holds a mark on (from its fdinfo);
/// None if that cannot be read.
pub fn marked_inodes(fan: BorrowedFd<'_>) -> Option<HashSet<(u64, u64)>> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fan.as_raw_fd())).ok()?;
    Some(parse_marks(&text))
}

/// Parses `fanotify ino:<hex> sdev:<hex> ...` lines; sdev is the kernel's dev_t (12-bit
/// major above a 20-bit minor), turned into the st_dev encoding.
fn parse_marks(text: &str) -> HashSet<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.strip_prefix("fanotify ino:")?.split_whitespace();
            let ino = u64::from_str_radix(it.next()?, 16).ok()?;
            let sdev = u64::from_str_radix(it.next()?.strip_prefix("sdev:")?, 16).ok()?;
            let dev = libc::makedev((sdev >> 20) as u32, (sdev & 0xfffff) as u32);
            Some((dev, ino))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn fdinfo_marks_are_parsed_into_st_dev() {
        let text = "pos:\t0\nflags:\t02004002\nmnt_id:\t15\nino:\t1057\n\
                    fanotify flags:10 event-flags:8000\n\
                    fanotify ino:4e0a3 sdev:fe00001 mflags:0 mask:10000 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a3e00400b1c2d3e4\n\
                    fanotify ino:2 sdev:800003 mflags:0 mask:8010000 ignored_mask:0\n";
        let marks = parse_marks(text);
        assert_eq!(marks.len(), 2);
        assert!(marks.contains(&(libc::makedev(254, 1), 0x4e0a3)));
        assert!(marks.contains(&(libc::makedev(8, 3), 2)));
    }

    #[test]
    fn handles_tell_files_apart_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let fa = open_path(&a, false).unwrap();
        let fb = open_path(&b, false).unwrap();
        let (Some(ha), Some(hb)) = (handle_of(fa.as_fd()), handle_of(fb.as_fd())) else {
            return; // this filesystem exports no handles
        };
        assert_ne!(ha, hb);
        assert_eq!(handle_of(open_path(&a, false).unwrap().as_fd()), Some(ha.clone()));
        let ino = std::fs::metadata(&a).unwrap().ino();
        let d = open_path(dir.path(), true).unwrap();
        // open_by_handle_at needs CAP_DAC_READ_SEARCH: only checked where we have it.
        if let Some(fd) = open_by_handle(d.as_fd(), &ha) {
            assert_eq!(key_of(fd.as_fd()).unwrap().1, ino);
        }
    }
}
