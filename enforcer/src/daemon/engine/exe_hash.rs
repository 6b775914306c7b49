//! sha256 of the executables named in alerts, computed off the decision path.
//!
//! At event time the engine only pins the running image: an `O_PATH` open of
//! `/proc/PID/exe`, which resolves the kernel's own reference to the mapped file and makes no
//! call into its filesystem (a FUSE server or a FIFO cannot stall it). A worker thread then
//! checks the pinned file (`fstat`: regular files only, at most `limits.exe_hash_max_bytes`),
//! reopens it through `/proc/self/fd` (`O_RDONLY|O_NONBLOCK`) and hashes it. The alert waits
//! for the result up to `WAIT`; after that, or if the file is refused, it is written with
//! `exe_sha256: null` and `exe_sha256_unknown` saying why. Nothing on the decision path reads
//! the file, so a 2 TiB sparse binary or a stuck filesystem costs the worker, never an answer.
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use crate::event::Event;

/// Longest an alert waits for its executable's hash before it is written without it.
pub const WAIT: Duration = Duration::from_millis(2000);
/// Hash jobs queued for the worker; past it alerts say "hash queue full".
const QUEUE: usize = 256;
/// Alerts held back waiting for a hash; past it they are written at once without one. Each
/// held alert is a few KB of heap: at 100k alerts/s a 64 MB executable takes long enough to
/// hash that 8192 held alerts were most of the daemon's 84 MB RSS under that load.
const MAX_DEFERRED: usize = 1024;
/// Results and cache entries kept (each a few hundred bytes).
const MAX_KEPT: usize = 4096;

/// What is known of a process's executable hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExeHash {
    Known(String),
    Unknown(String),
    /// The worker has job `id`.
    Pending(u64),
}

struct Job {
    id: u64,
    /// `O_PATH` fd of the running image.
    exe: OwnedFd,
}

/// Counters for the status document.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct HashCounts {
    pub exe_hashes_computed: u64,
    pub exe_hashes_unknown: u64,
    pub alerts_deferred: u64,
    pub alerts_deferred_max: usize,
}

pub struct ExeHasher {
    jobs: SyncSender<Job>,
    done: Receiver<(u64, ExeHash)>,
    next: u64,
    /// Results by job id, until no alert can ask for them any more.
    results: HashMap<u64, ExeHash>,
    /// Alerts waiting for job `.1` until `.2`, oldest first.
    deferred: VecDeque<(Event, u64, Instant)>,
    pub counts: HashCounts,
}

impl ExeHasher {
    pub fn new(max_bytes: u64) -> Self {
        let (jobs, rx) = sync_channel::<Job>(QUEUE);
        let (tx, done) = sync_channel(QUEUE * 2);
        std::thread::Builder::new()
            .name("exe-hash".into())
            .spawn(move || {
                let mut cache: HashMap<(u64, u64, u64, i64), String> = HashMap::new();
                for job in rx {
                    let r = hash_pinned(&job.exe, max_bytes, &mut cache);
                    if tx.send((job.id, r)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the exe-hash thread");
        ExeHasher {
            jobs,
            done,
            next: 0,
            results: HashMap::new(),
            deferred: VecDeque::new(),
            counts: HashCounts::default(),
        }
    }

    /// Pins the executable of `pid` now (bounded: one `O_PATH` open) and queues its hash.
    pub fn start(&mut self, pid: u32) -> ExeHash {
        let path = format!("/proc/{pid}/exe");
        let fd = match nix::fcntl::open(
            path.as_str(),
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) => {
                return ExeHash::Unknown(format!(
                    "the executable of process {pid} could not be opened ({e}); the process \
                     may have exited"
                ));
            }
        };
        self.next += 1;
        let id = self.next;
        match self.jobs.try_send(Job { id, exe: fd }) {
            Ok(()) => ExeHash::Pending(id),
            Err(TrySendError::Full(_)) => ExeHash::Unknown("exe hash queue full".into()),
            Err(TrySendError::Disconnected(_)) => {
                ExeHash::Unknown("exe hash worker stopped".into())
            }
        }
    }

    /// Alerts held back for a hash right now.
    pub fn waiting(&self) -> usize {
        self.deferred.len()
    }

    /// `h` with a finished job's result filled in.
    pub fn resolve(&self, h: &ExeHash) -> ExeHash {
        match h {
            ExeHash::Pending(id) => self.results.get(id).cloned().unwrap_or_else(|| h.clone()),
            other => other.clone(),
        }
    }

    /// Holds `e` back until job `id` finishes or `WAIT` passes; gives it back if too many
    /// wait already.
    pub fn defer(&mut self, e: Event, id: u64) -> Option<Event> {
        if self.deferred.len() >= MAX_DEFERRED {
            return Some(e);
        }
        self.deferred.push_back((e, id, Instant::now() + WAIT));
        self.counts.alerts_deferred += 1;
        self.counts.alerts_deferred_max = self.counts.alerts_deferred_max.max(self.deferred.len());
        None
    }

    /// Takes finished jobs; returns the held-back alerts that are ready (hash known, refused
    /// or overdue; all of them when `all`), with their hash fields filled in.
    pub fn ready(&mut self, all: bool) -> Vec<Event> {
        while let Ok((id, r)) = self.done.try_recv() {
            if self.results.len() >= MAX_KEPT {
                // Oldest ids first: only recent jobs can still be waited for.
                let mut ids: Vec<u64> = self.results.keys().copied().collect();
                ids.sort_unstable();
                for old in &ids[..ids.len() / 2] {
                    self.results.remove(old);
                }
            }
            self.results.insert(id, r);
        }
        let now = Instant::now();
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.deferred.len());
        for (mut e, id, deadline) in std::mem::take(&mut self.deferred) {
            let h = match self.results.get(&id) {
                Some(h) => h.clone(),
                None if all || now >= deadline => {
                    let h = ExeHash::Unknown(if now >= deadline {
                        format!("not hashed within {} ms (large or slow file)", WAIT.as_millis())
                    } else {
                        "the daemon stopped before the hash was ready".into()
                    });
                    // Later alerts of this executable do not wait again.
                    self.results.insert(id, h.clone());
                    h
                }
                None => {
                    keep.push_back((e, id, deadline));
                    continue;
                }
            };
            self.fill(&mut e, &h);
            out.push(e);
        }
        self.deferred = keep;
        out
    }

    /// Sets `exe_sha256` / `exe_sha256_unknown` of an alert.
    pub fn fill(&mut self, e: &mut Event, h: &ExeHash) {
        match h {
            ExeHash::Known(s) => {
                self.counts.exe_hashes_computed += 1;
                e.process.exe_sha256 = Some(Some(s.clone()));
            }
            ExeHash::Unknown(why) => {
                self.counts.exe_hashes_unknown += 1;
                e.process.exe_sha256 = Some(None);
                e.process.exe_sha256_unknown = Some(why.clone());
            }
            ExeHash::Pending(_) => {
                e.process.exe_sha256 = Some(None);
                e.process.exe_sha256_unknown = Some("hash pending".into());
            }
        }
    }
}

/// The worker's part: checks and hashes the pinned file. Cached by (dev, ino, size, mtime).
fn hash_pinned(
    exe: &OwnedFd,
    max_bytes: u64,
    cache: &mut HashMap<(u64, u64, u64, i64), String>,
) -> ExeHash {
    use sha2::Digest;
    let st = match nix::sys::stat::fstat(exe) {
        Ok(st) => st,
        Err(e) => return ExeHash::Unknown(format!("fstat of the executable failed: {e}")),
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return ExeHash::Unknown("the executable is not a regular file".into());
    }
    let size = st.st_size as u64;
    if size > max_bytes {
        return ExeHash::Unknown(format!(
            "the executable is too large to hash ({size} bytes; limits.exe_hash_max_bytes is \
             {max_bytes})"
        ));
    }
    let key = (st.st_dev, st.st_ino, size, st.st_mtime * 1_000_000_000 + st.st_mtime_nsec);
    if let Some(h) = cache.get(&key) {
        return ExeHash::Known(h.clone());
    }
    // The pinned inode, reopened for reading; O_NONBLOCK so a file that is not what fstat
    // said (a race with a FIFO is impossible for an inode, but cheap to rule out) never
    // blocks the worker in open().
    let reopen = format!("/proc/self/fd/{}", exe.as_raw_fd());
    let fd = match nix::fcntl::open(
        reopen.as_str(),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => return ExeHash::Unknown(format!("the executable could not be read: {e}")),
    };
    let mut f = File::from(fd);
    match f.metadata() {
        Ok(m) if m.is_file() && m.ino() == st.st_ino => {}
        _ => return ExeHash::Unknown("the executable changed while it was opened".into()),
    }
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                // A file growing under us is read no further than the cap.
                if total > max_bytes {
                    return ExeHash::Unknown(format!(
                        "the executable grew past limits.exe_hash_max_bytes ({max_bytes}) while \
                         it was hashed"
                    ));
                }
                h.update(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return ExeHash::Unknown(format!("reading the executable failed: {e}")),
        }
    }
    let hex = hex::encode(h.finalize());
    if cache.len() >= MAX_KEPT {
        cache.clear();
    }
    cache.insert(key, hex.clone());
    ExeHash::Known(hex)
}
