//! A FUSE file system whose reads are not answered until the test releases them: the tool of
//! the attacker who holds its own `mmap_lock` for as long as it likes. A process opens the
//! one file twice (the second open is answered `FOPEN_DIRECT_IO`), starts a read on the
//! first (the page-cache folio stays locked while the server sits on the READ) and then
//! `mmap()`s the second: `fuse_file_mmap` invalidates the file's pages under the process's
//! `mmap_lock`, held for writing, and waits for that folio. From then on every reader of the
//! process's memory (`/proc/PID/cmdline`, `/proc/PID/environ`, `process_vm_readv`) waits too,
//! until the server answers. Unprivileged users get the same with `fusermount3`; the tests
//! mount as root. Protocol: `<linux/fuse.h>`, the few requests this needs.
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const OPEN: u32 = 14;
const READ: u32 = 15;
const RELEASE: u32 = 18;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const RELEASEDIR: u32 = 29;
const INTERRUPT: u32 = 36;
const BATCH_FORGET: u32 = 42;
const FOPEN_DIRECT_IO: u32 = 1;
/// The one file's size: enough for a 64 KiB mapping.
const FILE_SIZE: u64 = 65_536;

pub struct StallFs {
    dir: tempfile::TempDir,
    /// The connection's number under /sys/fs/fuse/connections (the mount's minor).
    conn: Option<u32>,
    dev: Arc<File>,
    /// READ requests not answered yet (their `unique`).
    pending: Arc<Mutex<Vec<u64>>>,
    released: Arc<AtomicBool>,
}

impl StallFs {
    /// Mounts it; None (saying why) where this host has no FUSE.
    pub fn mount() -> Option<StallFs> {
        let dev = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
            Ok(f) => Arc::new(f),
            Err(e) => {
                eprintln!("skipped: /dev/fuse: {e}");
                return None;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let target = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        let opts = std::ffi::CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            dev.as_raw_fd()
        ))
        .unwrap();
        // SAFETY: plain mount(2) with NUL-terminated strings we own.
        let rc = unsafe {
            libc::mount(
                c"stallfs".as_ptr(),
                target.as_ptr(),
                c"fuse.stallfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            eprintln!("skipped: mount fuse: {}", std::io::Error::last_os_error());
            return None;
        }
        let mut fs =
            StallFs { dir, conn: None, dev, pending: Arc::default(), released: Arc::default() };
        let (dev, pending, released) = (fs.dev.clone(), fs.pending.clone(), fs.released.clone());
        std::thread::spawn(move || serve(&dev, &pending, &released));
        use std::os::unix::fs::MetadataExt;
        fs.conn = std::fs::metadata(fs.dir.path()).ok().map(|m| libc::minor(m.dev()));
        Some(fs)
    }

    /// The file whose reads stall.
    pub fn file(&self) -> PathBuf {
        self.dir.path().join("pages")
    }

    /// Answers every read from now on (pending ones with EIO): the attacker's process
    /// gets its lock back.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        for unique in std::mem::take(&mut *self.pending.lock().unwrap()) {
            reply(&self.dev, unique, -libc::EIO, &[]);
        }
    }
}

impl Drop for StallFs {
    /// Even when the test failed: reads answered, the connection aborted (nothing on this
    /// machine may stay stuck on it: `ps`, other daemons' starts), the mount detached.
    fn drop(&mut self) {
        self.release();
        if let Some(n) = self.conn {
            let _ = std::fs::write(format!("/sys/fs/fuse/connections/{n}/abort"), "1");
        }
        let target = std::ffi::CString::new(self.dir.path().as_os_str().as_encoded_bytes());
        if let Ok(t) = target {
            // SAFETY: umount2 on a path we mounted.
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn reply(dev: &File, unique: u64, error: i32, body: &[u8]) {
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend(((16 + body.len()) as u32).to_le_bytes());
    out.extend(error.to_le_bytes());
    out.extend(unique.to_le_bytes());
    out.extend(body);
    let _ = (&*dev).write_all(&out);
}

/// `struct fuse_attr` of the root directory (node 1) or the file (any other).
fn attr(node: u64) -> Vec<u8> {
    let (size, mode) = if node == 1 { (0, 0o40755u32) } else { (FILE_SIZE, 0o100644) };
    let mut a = Vec::with_capacity(88);
    a.extend(node.to_le_bytes());
    a.extend(size.to_le_bytes());
    a.extend((size / 512).to_le_bytes());
    a.extend([0u8; 3 * 8 + 3 * 4]); // times
    a.extend(mode.to_le_bytes());
    a.extend(1u32.to_le_bytes()); // nlink
    a.extend([0u8; 3 * 4]); // uid, gid, rdev
    a.extend(4096u32.to_le_bytes()); // blksize
    a.extend(0u32.to_le_bytes()); // flags
    a
}

fn serve(dev: &File, pending: &Mutex<Vec<u64>>, released: &AtomicBool) {
    let mut buf = vec![0u8; 1 << 20];
    let mut opens = 0u32;
    loop {
        let n = match (&*dev).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            // ENODEV once unmounted.
            Err(_) => return,
        };
        if n < 40 {
            continue;
        }
        let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap());
        let (opcode, unique, node) = (u32_at(4), u64_at(8), u64_at(16));
        match opcode {
            INIT => {
                let mut o = Vec::with_capacity(64);
                o.extend(7u32.to_le_bytes());
                o.extend(31u32.to_le_bytes());
                o.extend(65_536u32.to_le_bytes()); // max_readahead
                o.extend(0u32.to_le_bytes()); // flags
                o.extend(16u16.to_le_bytes()); // max_background
                o.extend(12u16.to_le_bytes()); // congestion_threshold
                o.extend(65_536u32.to_le_bytes()); // max_write
                o.extend(1u32.to_le_bytes()); // time_gran
                o.extend(16u16.to_le_bytes()); // max_pages
                o.extend([0u8; 2 + 4 + 4 + 24]);
                reply(dev, unique, 0, &o);
            }
            LOOKUP => {
                let mut o = Vec::with_capacity(128);
                o.extend(2u64.to_le_bytes()); // nodeid
                o.extend(1u64.to_le_bytes()); // generation
                o.extend([0u8; 8 + 8 + 4 + 4]); // no caching of entry and attributes
                o.extend(attr(2));
                reply(dev, unique, 0, &o);
            }
            GETATTR => {
                let mut o = vec![0u8; 16];
                o.extend(attr(node));
                reply(dev, unique, 0, &o);
            }
            OPEN | OPENDIR => {
                // The second open of the file is direct I/O: its mmap() invalidates the page
                // cache (under the mmap_lock) and so waits for the first open's read.
                let flags = if opcode == OPEN && opens > 0 { FOPEN_DIRECT_IO } else { 0 };
                opens += (opcode == OPEN) as u32;
                let mut o = 1u64.to_le_bytes().to_vec();
                o.extend(flags.to_le_bytes());
                o.extend(0u32.to_le_bytes());
                reply(dev, unique, 0, &o);
            }
            READ => {
                let mut p = pending.lock().unwrap();
                if released.load(Ordering::SeqCst) {
                    drop(p);
                    reply(dev, unique, -libc::EIO, &[]);
                } else {
                    p.push(unique);
                }
            }
            FLUSH | RELEASE | RELEASEDIR => reply(dev, unique, 0, &[]),
            FORGET | BATCH_FORGET | INTERRUPT => {}
            _ => reply(dev, unique, -libc::ENOSYS, &[]),
        }
    }
}

/// A process killed and reaped when dropped (after the `StallFs` it hangs on: declare it
/// first, so it is dropped last).
#[derive(Default)]
pub struct KillOnDrop(pub Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The attacker: python that takes its own `mmap_lock` hostage through `fs` (module doc),
/// prints `stalled`, and then, on each line read from stdin, opens `secret` once and
/// connects to 127.0.0.1:`port` once, printing the outcomes ("ok", or the errno name).
pub fn hostage_script(file: &Path, secret: &str, port: u16) -> String {
    format!(
        r#"
import ctypes, errno, mmap, os, socket, sys, threading, time
def use():
    out = []
    try:
        os.close(os.open({secret:?}, os.O_RDONLY)); out.append("open:ok")
    except OSError as e:
        out.append("open:" + errno.errorcode.get(e.errno, str(e.errno)))
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", {port})); out.append("connect:ok")
    except OSError as e:
        out.append("connect:" + errno.errorcode.get(e.errno, str(e.errno)))
    s.close()
    return " ".join(out)
use()  # warm: what the loop needs is allocated before the lock is taken
cached = os.open({file:?}, os.O_RDONLY)
direct = os.open({file:?}, os.O_RDONLY)
threading.Thread(target=lambda: os.read(cached, 4096), daemon=True).start()
time.sleep(0.3)
# Through ctypes, which lets go of the GIL during the call (the mmap module may not).
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
threading.Thread(target=lambda: libc.mmap(None, 65536, mmap.PROT_READ, mmap.MAP_PRIVATE, direct, 0), daemon=True).start()
time.sleep(0.3)
print("stalled", flush=True)
for line in sys.stdin:
    print(use(), flush=True)
"#,
        file = file.display().to_string()
    )
}
