//! Reads of other processes' memory, off the main loop: environments
//! (`/proc/PID/environ`) and, for a process the lineage records never showed the daemon
//! (it predates the daemon, or its records were lost), its `/proc` facts and command line.
//! Reading `environ` or `cmdline` copies pages out of the target's memory under its
//! `mmap_lock`, and the target can hold that lock for as long as it likes (a thread stuck in
//! `mmap()` of a FUSE file whose pages another thread's FUSE read keeps locked: the read
//! then never returns); an exec storm makes it a per-exec cost besides. So the main loop only
//! queues reads; a small pool of threads does them and the main loop takes the results when
//! it next looks (`replies`), never waiting for one.
//!
//! Three queues, taken in this order: alerts' reads (`urgent`), the start's reads of the
//! processes already running (`seed`, as long as `/proc` is), and the routine read after an
//! exec (`routine`, at most `ROUTINE_PER_SEC` a second). A read stuck in the kernel holds one
//! thread; the others go on, and when every thread is stuck the queues fill and further
//! requests are refused at once (the caller marks the facts unknown).
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::env::{self, EnvInfo};
use super::procfs::{self, Basics};

/// Reader threads: a stuck read holds one of them.
const THREADS: usize = 3;
/// Routine reads handed out per second, at most.
pub const ROUTINE_PER_SEC: u32 = 500;
/// Queued requests, per queue; past it a request is refused.
const ROUTINE_QUEUE: usize = 64;
const URGENT_QUEUE: usize = 256;

/// What became of the environment reads (status `env_reads`).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct EnvReadCounts {
    /// Environments read and applied.
    pub read: u64,
    /// Reads asked for at once by an alert (its process's environment not read yet).
    pub urgent: u64,
    /// Not read: the process exited (or exec'd again) before its read was handed out.
    pub exited_first: u64,
    /// Not read: the process runs outside the policy's cgroup scope.
    pub out_of_scope: u64,
    /// Not read: over the rate or a queue bound (its job and keys stay what it inherited).
    pub skipped: u64,
    /// The read failed (the process was gone by then, or its memory unreadable).
    pub failed: u64,
    /// Processes the lineage records had not shown (running before the daemon started,
    /// or their records lost) whose command line was read off the main loop.
    pub processes_read: u64,
    /// Of those, ones whose command line could not be read (gone, or unreadable).
    pub processes_failed: u64,
}

/// (pid, exec generation in the table): a result is applied only to the image it was asked
/// for, so a reused pid or a later exec never receives another image's environment.
pub type Ticket = (u32, u64);
pub type Reply = (Ticket, Got);

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The environment only.
    Environ,
    /// A process the daemon learns from `/proc`: with `basics`, first its `Basics` (a reply
    /// of their own, since they cannot block), then its command line and environment.
    Process { basics: bool },
}

/// A read's result.
#[derive(Debug)]
pub enum Got {
    Environ(Result<EnvInfo, String>),
    /// `Want::Process { basics: true }`'s first reply (None: gone, or not a process).
    Basics(Option<Basics>),
    /// `Want::Process`'s last reply: argv (and whether it was cut) and, with a key, the
    /// environment.
    Memory {
        argv: Result<(Vec<String>, bool), String>,
        env: Option<Result<EnvInfo, String>>,
    },
}

impl Got {
    /// Whether this is the last reply to its request.
    fn is_last(&self) -> bool {
        !matches!(self, Got::Basics(_))
    }
}

#[derive(Default)]
struct Queues {
    urgent: VecDeque<(Ticket, Want)>,
    seed: VecDeque<(Ticket, Want)>,
    routine: VecDeque<(Ticket, Want)>,
    closed: bool,
}

struct Shared {
    queues: Mutex<Queues>,
    ready: Condvar,
}

pub struct EnvReader {
    shared: Arc<Shared>,
    replies: Receiver<Reply>,
    /// Kept so `spawn` can hand new threads a sender.
    reply_tx: Sender<Reply>,
    key: Option<Arc<Vec<u8>>>,
    proc_root: PathBuf,
    started: bool,
    /// Tickets queued or being read.
    in_flight: HashMap<u32, u64>,
    /// Start of the current second and routine reads handed out in it.
    bucket: (Instant, u32),
    pub counts: EnvReadCounts,
}

impl EnvReader {
    /// Threads start on the first request. `proc_root` is `/proc` but in tests. Without a
    /// fingerprint key no environment is read.
    pub fn new(key: Option<Vec<u8>>, proc_root: PathBuf) -> Self {
        let (reply_tx, replies) = channel();
        EnvReader {
            shared: Arc::new(Shared { queues: Mutex::default(), ready: Condvar::new() }),
            replies,
            reply_tx,
            key: key.map(Arc::new),
            proc_root,
            started: false,
            in_flight: HashMap::new(),
            bucket: (Instant::now(), 0),
            counts: EnvReadCounts::default(),
        }
    }

    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref().map(Vec::as_slice)
    }

    /// True while `ticket` is queued or being read.
    pub fn in_flight(&self, ticket: Ticket) -> bool {
        self.in_flight.get(&ticket.0) == Some(&ticket.1)
    }

    /// Queues an environment read; false (and counted as skipped) when refused: a queue is
    /// full, the routine rate is spent, or no thread could be started.
    pub fn request(&mut self, ticket: Ticket, urgent: bool) -> bool {
        let queue = if urgent { Queue::Urgent } else { Queue::Routine };
        self.ask(ticket, Want::Environ, queue)
    }

    /// Queues `want` for `ticket` on `queue`; false when refused (as `request`). The seed
    /// queue has no bound but `/proc`'s.
    pub fn ask(&mut self, ticket: Ticket, want: Want, queue: Queue) -> bool {
        if self.in_flight(ticket) {
            return true;
        }
        let urgent = queue != Queue::Routine;
        if !urgent {
            let now = Instant::now();
            if now.duration_since(self.bucket.0) >= Duration::from_secs(1) {
                self.bucket = (now, 0);
            }
            if self.bucket.1 >= ROUTINE_PER_SEC {
                self.counts.skipped += 1;
                return false;
            }
        }
        if !self.started && !self.start() {
            self.counts.skipped += 1;
            return false;
        }
        let mut q = lock(&self.shared.queues);
        let (queue, cap) = match queue {
            Queue::Urgent => (&mut q.urgent, URGENT_QUEUE),
            Queue::Seed => (&mut q.seed, usize::MAX),
            Queue::Routine => (&mut q.routine, ROUTINE_QUEUE),
        };
        if queue.len() >= cap {
            drop(q);
            self.counts.skipped += 1;
            return false;
        }
        queue.push_back((ticket, want));
        drop(q);
        self.shared.ready.notify_one();
        if !urgent {
            self.bucket.1 += 1;
        }
        self.in_flight.insert(ticket.0, ticket.1);
        true
    }

    /// Finished reads, without waiting.
    pub fn replies(&mut self) -> Vec<Reply> {
        let mut out = Vec::new();
        // The sender is held here too: never disconnected.
        while let Ok(r) = self.replies.try_recv() {
            if r.1.is_last() && self.in_flight.get(&r.0.0) == Some(&r.0.1) {
                self.in_flight.remove(&r.0.0);
            }
            out.push(r);
        }
        out
    }

    fn start(&mut self) -> bool {
        for i in 0..THREADS {
            let (shared, tx) = (self.shared.clone(), self.reply_tx.clone());
            let (key, root) = (self.key.clone(), self.proc_root.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("proc-read-{i}"))
                // Reads are bounded (`env::MAX_ENVIRON`, on the heap); a small stack is enough.
                .stack_size(128 * 1024)
                .spawn(move || worker(&shared, &tx, key.as_deref().map(Vec::as_slice), &root));
            if let Err(e) = spawned {
                tracing::warn!("cannot start an environment reader thread: {e}");
                if i == 0 {
                    return false;
                }
                break;
            }
        }
        self.started = true;
        true
    }
}

impl Drop for EnvReader {
    fn drop(&mut self) {
        lock(&self.shared.queues).closed = true;
        self.shared.ready.notify_all();
    }
}

/// Which queue a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    Urgent,
    Seed,
    Routine,
}

fn worker(shared: &Shared, tx: &Sender<Reply>, key: Option<&[u8]>, root: &std::path::Path) {
    loop {
        let (ticket, want) = {
            let mut q = lock(&shared.queues);
            loop {
                if q.closed {
                    return;
                }
                if let Some(t) = q
                    .urgent
                    .pop_front()
                    .or_else(|| q.seed.pop_front())
                    .or_else(|| q.routine.pop_front())
                {
                    break t;
                }
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let environ = |key: &[u8]| {
            let path = root.join(ticket.0.to_string()).join("environ");
            env::read_path(&path, key).map_err(|e| e.to_string())
        };
        let got = match want {
            Want::Environ => Got::Environ(match key {
                Some(k) => environ(k),
                None => Err("no fingerprint key".into()),
            }),
            Want::Process { basics } => {
                if basics {
                    let b = procfs::basics_at(root, ticket.0);
                    let gone = b.is_none();
                    if tx.send((ticket, Got::Basics(b))).is_err() {
                        return;
                    }
                    if gone {
                        let why = "the process is gone (or is not a process)".to_string();
                        let _ = tx.send((ticket, Got::Memory { argv: Err(why), env: None }));
                        continue;
                    }
                }
                // These two can block for as long as the target wants (module doc).
                let argv = procfs::argv_at(root, ticket.0).map_err(|e| e.to_string());
                Got::Memory { argv, env: key.map(environ) }
            }
        };
        if tx.send((ticket, got)).is_err() {
            return;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn environ(g: &Got) -> &Result<EnvInfo, String> {
        match g {
            Got::Environ(r) => r,
            other => panic!("not an environment read: {other:?}"),
        }
    }

    fn wait_replies(r: &mut EnvReader, n: usize) -> Vec<Reply> {
        let t0 = Instant::now();
        let mut out = Vec::new();
        while out.len() < n && t0.elapsed() < Duration::from_secs(5) {
            out.extend(r.replies());
            std::thread::sleep(Duration::from_millis(2));
        }
        out
    }

    /// A read that blocks in the kernel (here: opening a FIFO nobody writes, where
    /// `/proc/PID/environ` would be a page that never faults in) holds one thread; other
    /// reads, urgent first, are still answered, and the caller never waits.
    #[test]
    fn a_stuck_read_holds_one_thread_not_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let stuck = dir.path().join("10");
        std::fs::create_dir(&stuck).unwrap();
        nix::unistd::mkfifo(&stuck.join("environ"), nix::sys::stat::Mode::S_IRUSR).unwrap();
        for (pid, env) in [(11, "ENFORCER_JOB_ID=j11\0"), (12, "CI_JOB_ID=12\0DEPLOY_TOKEN=x\0")] {
            std::fs::create_dir(dir.path().join(pid.to_string())).unwrap();
            std::fs::write(dir.path().join(pid.to_string()).join("environ"), env).unwrap();
        }
        let mut r = EnvReader::new(Some(vec![1; 32]), dir.path().to_path_buf());
        let t0 = Instant::now();
        assert!(r.request((10, 1), true));
        assert!(r.request((11, 1), false));
        assert!(r.request((12, 3), true));
        assert!(r.request((13, 1), true), "a missing process is a failed read, not a refusal");
        assert!(t0.elapsed() < Duration::from_millis(50), "requests never wait");
        assert!(r.in_flight((10, 1)) && !r.in_flight((10, 2)));
        let mut got = wait_replies(&mut r, 3);
        got.sort_by_key(|x| x.0);
        assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), [(11, 1), (12, 3), (13, 1)]);
        assert_eq!(environ(&got[0].1).as_ref().unwrap().job.as_ref().unwrap().id, "j11");
        let twelve = environ(&got[1].1).as_ref().unwrap();
        assert_eq!(twelve.credentials[0].name, "DEPLOY_TOKEN");
        assert!(environ(&got[2].1).is_err());
        assert!(r.in_flight((10, 1)), "the stuck read is still out");
        // Unblock the stuck read: its answer arrives too.
        let w = std::fs::OpenOptions::new().write(true).open(stuck.join("environ")).unwrap();
        drop(w);
        let got = wait_replies(&mut r, 1);
        assert_eq!(got[0].0, (10, 1));
        assert!(!r.in_flight((10, 1)));
    }

    #[test]
    fn routine_reads_are_rate_bounded_and_queues_refuse_when_full() {
        let dir = tempfile::tempdir().unwrap();
        // Every reader thread stuck: the queues fill and refuse, urgent ones too.
        for pid in 1..=THREADS as u32 {
            let d = dir.path().join(pid.to_string());
            std::fs::create_dir(&d).unwrap();
            nix::unistd::mkfifo(&d.join("environ"), nix::sys::stat::Mode::S_IRUSR).unwrap();
        }
        let mut r = EnvReader::new(Some(vec![1; 32]), dir.path().to_path_buf());
        for pid in 1..=THREADS as u32 {
            assert!(r.request((pid, 1), true));
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut accepted = 0;
        for pid in 100..100 + URGENT_QUEUE as u32 + 10 {
            accepted += r.request((pid, 1), true) as usize;
        }
        assert_eq!(accepted, URGENT_QUEUE);
        let mut routine = 0;
        for pid in 1000..1000 + ROUTINE_PER_SEC {
            routine += r.request((pid, 1), false) as usize;
        }
        assert_eq!(routine, ROUTINE_QUEUE);
        assert_eq!(r.counts.skipped, 10 + (ROUTINE_PER_SEC as u64 - ROUTINE_QUEUE as u64));
        for pid in 1..=THREADS as u32 {
            let f = dir.path().join(pid.to_string()).join("environ");
            drop(std::fs::OpenOptions::new().write(true).open(f).unwrap());
        }
    }
}
