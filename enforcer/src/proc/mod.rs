//! The daemon's view of processes: fed by the kernel's lineage records (so short-lived
//! processes keep their exe and cmdline after they exit), seeded from /proc at start for
//! processes that were already running. The main loop never reads another process's memory
//! (`cmdline`, `environ`): a process the table has not seen gets an entry at once from what
//! the kernel record says (pid, uid, cgroup), and the rest is read off the main loop
//! (`env_reader`).
pub mod env;
pub mod env_reader;
mod procfs;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use crate::cgroup::is_within;
pub use procfs::{Basics, current_cgroup, start_ns, subtree_since};

use crate::cgroup::CgroupResolver;
use crate::records::Record;
use crate::redact::Redactor;

/// How long an exited process stays resolvable: its last file or connect events may still
/// be queued behind its exit record (the rings are drained every 20 ms; a violation record on
/// the ALERTS ring may be read after the exit record on EVENTS). Every exec'd process stays
/// this long, so it bounds the table under an exec storm (rate x grace entries).
const EXITED_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, serde::Serialize)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub exe: String,
    /// argv with credential-shaped values and known secret values redacted
    /// (`crate::redact`): it is what events carry.
    pub cmdline: Vec<String>,
    pub cgroup_id: u64,
    /// Boot-clock ns when the process was created (0 when it predates the daemon):
    /// with the pid, the subject's identity, so a reused pid is never the same subject.
    pub start_ns: u64,
    /// Grant slots the kernel reported for this process at fork and at exit: lets a
    /// decision made after the process is gone (fanotify notifications) see what it held.
    pub grants: Vec<u32>,
    /// CI job (from the environment at exec, else inherited from the parent).
    pub job: Option<env::Job>,
    /// Static credentials in the environment at exec (names and fingerprints only).
    pub env_credentials: Vec<env::EnvCredential>,
    /// Whether `job` and `env_credentials` were read for this image or are what it
    /// inherited at fork (`env_reader`).
    #[serde(skip)]
    pub env: EnvState,
    /// Which entry for this pid the table holds (every exec, fork and entry made from
    /// `/proc` gets a new one): reads are applied only to the entry they were asked for.
    #[serde(skip)]
    pub exec_seq: u64,
    /// Whether `ppid`, `exe` and `cmdline` are known or still being read.
    #[serde(skip)]
    pub facts: Facts,
    #[serde(skip)]
    pub exited_at: Option<Instant>,
}

/// Whether a process's `ppid`, `exe` and `cmdline` are known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Facts {
    /// From the lineage records, or read from `/proc`.
    #[default]
    Known,
    /// Not known and no read is out (a fork of a process the table did not know).
    Missing,
    /// A read is out (`env_reader`); `Basics` may have landed already.
    Reading,
    /// Could not be read; why.
    Unknown(String),
}

impl Process {
    /// Why `ppid`, `exe` and `cmdline` are not known (None when they are), for events.
    pub fn facts_unknown(&self) -> Option<String> {
        match &self.facts {
            Facts::Known => None,
            Facts::Reading => Some(
                "not read yet: the process was not in the lineage records (running before the \
                 daemon started, or its records were lost); /proc is read off the main loop"
                    .into(),
            ),
            Facts::Missing => Some("not read: the /proc read queue is full".into()),
            Facts::Unknown(why) => Some(why.clone()),
        }
    }

    /// An entry for a process the table has not seen: what a kernel record says (pid, uid,
    /// cgroup); the rest is to be read (`Facts::Missing`).
    fn unseen(pid: u32, seq: u64, uid: u32, cgroup_id: u64) -> Process {
        Process {
            pid,
            ppid: 0,
            uid,
            exe: String::new(),
            cmdline: Vec::new(),
            cgroup_id,
            start_ns: 0,
            grants: Vec::new(),
            job: None,
            env_credentials: Vec::new(),
            env: EnvState::Inherited,
            exec_seq: seq,
            facts: Facts::Missing,
            exited_at: None,
        }
    }
}

/// Where a process's `job` and `env_credentials` come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EnvState {
    /// Copied from the parent at fork (exact until the process execs) or not read yet.
    #[default]
    Inherited,
    /// A read is queued or running (`env_reader`).
    Reading,
    /// Read from this image's environment.
    Read,
    /// The read failed or was refused; why.
    Unknown(String),
}

/// An alert's view of its process's environment facts (`ProcessTable::env_for_alert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvFacts {
    /// The table's `job` and `env_credentials` are this image's own.
    Known,
    /// A read is out for this exec generation: look again later.
    Reading(u64),
    /// They cannot be known; why (the table's inherited values stand).
    Unknown(String),
}

pub struct ProcessTable {
    /// Boxed: the buckets stay small (16 bytes), so the capacity steps a storm's peak
    /// leaves behind cost little, and the entries' memory is reused as they come and go.
    procs: HashMap<u32, Box<Process>>,
    /// Key for environment-credential fingerprints (None: environments are not read).
    /// Also keys the command-line redaction fingerprints, so `[redacted:H]` is the prefix of
    /// the `env_credentials` fingerprint of the same value.
    pub fingerprint_key: Option<Vec<u8>>,
    /// Redacts every command line entering the table; built on first use from
    /// `fingerprint_key` (a random key without one), rebuilt when that key changes.
    redactor: Option<(Option<Vec<u8>>, Redactor)>,
    /// Known secret values (`set_secret_literals`), kept to rebuild the redactor.
    literals: Vec<Vec<u8>>,
    pub cgroups: CgroupResolver,
    /// exec'd filename -> canonical path; saves the path walk on every exec of the same file.
    exe_cache: HashMap<String, String>,
    /// Reads of other processes' memory, off the main loop; built on first use, rebuilt
    /// when `fingerprint_key` changes.
    env_reader: Option<env_reader::EnvReader>,
    /// Execs applied since the last `env_pass`: (pid, exec generation).
    execs_since_pass: Vec<(u32, u64)>,
    exec_seq: u64,
    /// Where environments are read from (`/proc`; a directory of fixtures in tests).
    proc_root: PathBuf,
}

/// Bound on the exe cache; it is simply cleared when full.
const EXE_CACHE_MAX: usize = 4096;

impl ProcessTable {
    pub fn new(cgroup_mount: PathBuf) -> Self {
        ProcessTable {
            procs: HashMap::new(),
            fingerprint_key: None,
            redactor: None,
            literals: Vec::new(),
            cgroups: CgroupResolver::new(cgroup_mount),
            exe_cache: HashMap::new(),
            env_reader: None,
            execs_since_pass: Vec::new(),
            exec_seq: 0,
            proc_root: PathBuf::from("/proc"),
        }
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    /// (entries the table's buckets can hold, executable paths cached), for `status`.
    pub fn capacities(&self) -> (usize, usize) {
        (self.procs.capacity(), self.exe_cache.len())
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// Registers the values of watched secrets (e.g. `crate::redact::literals_from_secret`
    /// over each secret file's contents): command lines recorded from now on show them only
    /// as `[redacted:H]`. Replaces the previous set.
    pub fn set_secret_literals(&mut self, literals: Vec<Vec<u8>>) {
        self.literals = literals;
        if let Some((_, r)) = self.redactor.as_mut() {
            r.set_literals(self.literals.clone());
        }
    }

    /// The redactor for the current fingerprint key.
    fn redactor(&mut self) -> &Redactor {
        let stale = self.redactor.as_ref().is_none_or(|(k, _)| *k != self.fingerprint_key);
        if stale {
            let r = match &self.fingerprint_key {
                Some(k) => Redactor::new(k),
                None => Redactor::random(),
            };
            self.redactor =
                Some((self.fingerprint_key.clone(), r.with_literals(self.literals.clone())));
        }
        &self.redactor.as_ref().expect("built above").1
    }

    /// argv as events may carry it: redacted, with `...` when the kernel cut it off.
    pub fn redact_cmdline(&mut self, argv: &[String], truncated: bool) -> Vec<String> {
        let mut out = self.redactor().redact_argv(argv, truncated);
        if truncated {
            out.push("...".into());
        }
        out
    }

    /// A new entry generation (`Process::exec_seq`).
    fn next_seq(&mut self) -> u64 {
        self.exec_seq += 1;
        self.exec_seq
    }

    /// Adds every process in /proc that the lineage records have not told us about: what
    /// cannot block now (`Basics`), its command line and environment by the reader threads.
    pub fn seed_from_proc(&mut self) {
        for pid in procfs::pids() {
            if !self.procs.contains_key(&pid) {
                self.add_from_basics(pid, env_reader::Queue::Seed);
            }
        }
    }

    /// Enters an unseen `pid` from its `Basics` (read now: they never wait on the process's
    /// memory) and asks the reader threads, on `queue`, for its command line and environment.
    fn add_from_basics(&mut self, pid: u32, queue: env_reader::Queue) {
        let Some(b) = procfs::basics_at(&self.proc_root, pid) else { return };
        let seq = self.next_seq();
        let cgroup_id = b.cgroup.as_deref().and_then(|c| self.cgroups.id_of(c)).unwrap_or(0);
        let mut p = Process::unseen(pid, seq, b.uid, cgroup_id);
        (p.ppid, p.exe) = (b.ppid, b.exe);
        self.procs.insert(pid, Box::new(p));
        self.ask_process(pid, seq, env_reader::Want::Process { basics: false }, queue);
    }

    /// Asks the reader threads for `pid`'s facts (entry generation `seq`); marks the entry
    /// `Reading` when the request is taken (it stays `Missing` when refused, so a later
    /// lookup asks again). Returns whether it was taken.
    fn ask_process(
        &mut self,
        pid: u32,
        seq: u64,
        want: env_reader::Want,
        queue: env_reader::Queue,
    ) -> bool {
        let with_env = self.fingerprint_key.is_some();
        let taken = self.reader().ask((pid, seq), want, queue);
        if let Some(p) = self.procs.get_mut(&pid).filter(|p| p.exec_seq == seq) {
            if taken {
                p.facts = Facts::Reading;
                if with_env {
                    p.env = EnvState::Reading;
                }
            } else {
                p.facts = Facts::Missing;
            }
        }
        taken
    }

    pub fn apply(&mut self, rec: &Record) {
        match rec {
            Record::Fork { parent, child, uid, cgroup_id, boot_ns, grants } => {
                // A parent the table does not know is not read here (see the module doc).
                let seq = self.next_seq();
                let base = self.procs.get(parent).map(|p| Process::clone(p));
                let p = match base {
                    Some(parent_proc) => Process {
                        pid: *child,
                        ppid: *parent,
                        uid: *uid,
                        cgroup_id: *cgroup_id,
                        start_ns: *boot_ns,
                        grants: grants.clone(),
                        exited_at: None,
                        // The child's environment is the parent's until it execs: a read
                        // of the parent stands for it, a pending one does not.
                        env: match parent_proc.env {
                            EnvState::Read => EnvState::Read,
                            _ => EnvState::Inherited,
                        },
                        exec_seq: seq,
                        // The parent's facts are the child's; a read out for the parent is
                        // not one for the child.
                        facts: match parent_proc.facts {
                            Facts::Known => Facts::Known,
                            Facts::Unknown(why) => Facts::Unknown(why),
                            Facts::Missing | Facts::Reading => Facts::Missing,
                        },
                        ..parent_proc
                    },
                    None => Process {
                        ppid: *parent,
                        start_ns: *boot_ns,
                        grants: grants.clone(),
                        ..Process::unseen(*child, seq, *uid, *cgroup_id)
                    },
                };
                self.procs.insert(*child, Box::new(p));
            }
            Record::Exec { tgid, uid, cgroup_id, filename, argv, argv_truncated, .. } => {
                let exe = self.resolve_exe(*tgid, filename);
                let cmdline = self.redact_cmdline(argv, *argv_truncated);
                // The fork record made the entry (its fields move out and its box is reused:
                // no clone or allocation per exec); a pid the table never saw (lineage
                // attached after its fork) has ppid unknown (0) rather than a /proc read here.
                let mut slot = self.procs.remove(tgid);
                let (ppid, start_ns, grants, job, env_credentials) = match slot.as_deref_mut() {
                    Some(p) => (
                        p.ppid,
                        p.start_ns,
                        std::mem::take(&mut p.grants),
                        p.job.take(),
                        std::mem::take(&mut p.env_credentials),
                    ),
                    None => (0, 0, Vec::new(), None, Vec::new()),
                };
                // The new image's environment is read later, off the main loop
                // (`env_pass`); until then what it inherited at fork stands.
                self.exec_seq += 1;
                if self.fingerprint_key.is_some() {
                    self.execs_since_pass.push((*tgid, self.exec_seq));
                }
                let process = Process {
                    pid: *tgid,
                    ppid,
                    uid: *uid,
                    exe,
                    cmdline,
                    cgroup_id: *cgroup_id,
                    start_ns,
                    grants,
                    job,
                    env_credentials,
                    env: EnvState::Inherited,
                    exec_seq: self.exec_seq,
                    facts: Facts::Known,
                    exited_at: None,
                };
                let entry = match slot {
                    Some(mut b) => {
                        *b = process;
                        b
                    }
                    None => Box::new(process),
                };
                self.procs.insert(*tgid, entry);
            }
            Record::Exit { tgid, grants } => {
                if let Some(p) = self.procs.get_mut(tgid) {
                    p.exited_at = Some(Instant::now());
                    p.grants = grants.clone();
                }
            }
            Record::Connect(c) => {
                // A process may have moved cgroups since exec; the hook saw the current one
                // (an egress record carries none: 0).
                if let Some(p) = self.procs.get_mut(&c.tgid)
                    && c.cgroup_id != 0
                {
                    p.cgroup_id = c.cgroup_id;
                }
            }
            Record::Socket(s) => {
                if let Some(p) = self.procs.get_mut(&s.tgid) {
                    p.cgroup_id = s.cgroup_id;
                }
            }
            Record::FileOpen(o) => {
                if let Some(p) = self.procs.get_mut(&o.tgid) {
                    p.cgroup_id = o.cgroup_id;
                }
            }
            Record::Ipc(i) => {
                if let Some(p) = self.procs.get_mut(&i.tgid) {
                    p.cgroup_id = i.cgroup_id;
                }
            }
            Record::Malformed { .. } => {}
        }
    }

    /// The reader for the current fingerprint key (without one it reads no environment).
    fn reader(&mut self) -> &mut env_reader::EnvReader {
        let key = self.fingerprint_key.as_deref();
        if self.env_reader.as_ref().is_none_or(|r| r.key() != key) {
            let r = env_reader::EnvReader::new(key.map(<[u8]>::to_vec), self.proc_root.clone());
            self.env_reader = Some(r);
        }
        self.env_reader.as_mut().expect("built above")
    }

    /// Where environments are read from (`/proc`); tests point it at fixtures.
    #[cfg(test)]
    pub fn set_proc_root(&mut self, root: PathBuf) {
        self.proc_root = root;
        self.env_reader = None;
    }

    /// Counts of the environment reads.
    pub fn env_counts(&self) -> env_reader::EnvReadCounts {
        self.env_reader.as_ref().map(|r| r.counts).unwrap_or_default()
    }

    /// The reads' turn, after each batch of records and on every tick; never waits.
    /// Applies finished reads, then hands out a routine environment read for each exec since
    /// the last pass whose process still runs that image inside `scope` (a storm's
    /// short-lived processes have exited by then and cost nothing). Returns the pids whose
    /// environment was applied (their static credentials may need reporting).
    pub fn env_pass(&mut self, scope: &str) -> Vec<u32> {
        let applied = self.apply_reads();
        if self.fingerprint_key.is_none() {
            self.execs_since_pass.clear();
            return applied;
        }
        for (pid, seq) in std::mem::take(&mut self.execs_since_pass) {
            let reader = self.env_reader.as_mut().expect("built by apply_reads");
            let cgroup_id = match self.procs.get(&pid) {
                Some(p) if p.exec_seq == seq && p.exited_at.is_none() => match p.env {
                    // Asked for already by an alert.
                    EnvState::Inherited => p.cgroup_id,
                    _ => continue,
                },
                _ => {
                    reader.counts.exited_first += 1;
                    continue;
                }
            };
            if !self.cgroups.path(cgroup_id).is_some_and(|c| is_within(&c, scope)) {
                self.reader().counts.out_of_scope += 1;
                continue;
            }
            if self.reader().request((pid, seq), false)
                && let Some(p) = self.procs.get_mut(&pid)
            {
                p.env = EnvState::Reading;
            }
        }
        applied
    }

    /// Applies the reads that finished, to the entries they were asked for; returns the pids
    /// whose environment was applied.
    fn apply_reads(&mut self) -> Vec<u32> {
        let mut applied = Vec::new();
        for ((pid, seq), got) in self.reader().replies() {
            if self.procs.get(&pid).is_none_or(|p| p.exec_seq != seq) {
                continue;
            }
            match got {
                env_reader::Got::Environ(r) => {
                    if self.apply_env(pid, r) {
                        applied.push(pid);
                    }
                }
                env_reader::Got::Basics(b) => self.apply_basics(pid, b),
                env_reader::Got::Memory { argv, env } => {
                    let cmdline = argv.map(|(argv, cut)| self.redact_cmdline(&argv, cut));
                    let counts = &mut self.reader().counts;
                    match &cmdline {
                        Ok(_) => counts.processes_read += 1,
                        Err(_) => counts.processes_failed += 1,
                    }
                    let p = self.procs.get_mut(&pid).expect("checked above");
                    match cmdline {
                        Ok(c) => (p.cmdline, p.facts) = (c, Facts::Known),
                        Err(e) => {
                            p.facts = Facts::Unknown(format!(
                                "its command line could not be read ({e}); the process may have exited"
                            ))
                        }
                    }
                    if p.env == EnvState::Reading && env.is_none() {
                        p.env = EnvState::Inherited;
                    }
                    if let Some(r) = env
                        && self.apply_env(pid, r)
                    {
                        applied.push(pid);
                    }
                }
            }
        }
        applied
    }

    /// An environment read's result; true when it was applied.
    fn apply_env(&mut self, pid: u32, r: Result<env::EnvInfo, String>) -> bool {
        let Some(p) = self.procs.get_mut(&pid) else { return false };
        let ok = match r {
            Ok(info) => {
                p.job = info.job.or(p.job.take());
                p.env_credentials = info.credentials;
                p.env = EnvState::Read;
                true
            }
            Err(e) => {
                p.env = EnvState::Unknown(format!(
                    "the environment could not be read ({e}); the process may have exited"
                ));
                false
            }
        };
        let counts = &mut self.reader().counts;
        match ok {
            true => counts.read += 1,
            false => counts.failed += 1,
        }
        ok
    }

    /// What /proc said without touching the process's memory: fills what the record left
    /// open; a process that is gone is marked exited.
    fn apply_basics(&mut self, pid: u32, b: Option<Basics>) {
        let cgroup_id =
            b.as_ref().and_then(|b| b.cgroup.as_deref()).and_then(|c| self.cgroups.id_of(c));
        let Some(p) = self.procs.get_mut(&pid) else { return };
        let Some(b) = b else {
            p.exited_at.get_or_insert_with(Instant::now);
            return;
        };
        if p.ppid == 0 {
            p.ppid = b.ppid;
        }
        if p.exe.is_empty() {
            p.exe = b.exe;
        }
        p.uid = b.uid;
        if p.cgroup_id == 0 {
            p.cgroup_id = cgroup_id.unwrap_or(0);
        }
    }

    /// For an alert about `pid`: whether its facts (environment; exe and command line of a
    /// process learned from /proc) are its own, being read (a read is asked for at once if
    /// none is out), or cannot be known. Never reads.
    pub fn env_for_alert(&mut self, pid: u32) -> EnvFacts {
        let Some(p) = self.procs.get(&pid) else {
            return EnvFacts::Unknown("the process is not in the process table".into());
        };
        let seq = p.exec_seq;
        if p.facts == Facts::Missing {
            let want = env_reader::Want::Process { basics: true };
            self.ask_process(pid, seq, want, env_reader::Queue::Urgent);
        }
        let p = &self.procs[&pid];
        if p.facts == Facts::Reading {
            return EnvFacts::Reading(seq);
        }
        match &p.env {
            EnvState::Read => return EnvFacts::Known,
            EnvState::Reading => return EnvFacts::Reading(seq),
            EnvState::Unknown(why) => return EnvFacts::Unknown(why.clone()),
            EnvState::Inherited if p.exited_at.is_some() => {
                return EnvFacts::Unknown(
                    "the process exited before its environment was read".into(),
                );
            }
            EnvState::Inherited => {}
        }
        if self.fingerprint_key.is_none() {
            return EnvFacts::Unknown("no fingerprint key: environments are not read".into());
        }
        let reader = self.reader();
        if !reader.request((pid, seq), true) {
            return EnvFacts::Unknown("environment read queue full".into());
        }
        reader.counts.urgent += 1;
        if let Some(p) = self.procs.get_mut(&pid) {
            p.env = EnvState::Reading;
        }
        EnvFacts::Reading(seq)
    }

    /// The process if the table has it (no /proc read).
    pub fn get(&self, pid: u32) -> Option<&Process> {
        self.procs.get(&pid).map(|p| &**p)
    }

    /// The process; one the table has not seen gets an entry at once from what the kernel
    /// record says (`uid`, `cgroup_id`, 0 when it says nothing) and its other facts are read
    /// off the main loop (`Facts::Reading`; `Missing` while the read queue refuses).
    pub fn get_or_request(
        &mut self,
        pid: u32,
        uid: Option<u32>,
        cgroup_id: Option<u64>,
    ) -> &Process {
        if !self.procs.contains_key(&pid) {
            let seq = self.next_seq();
            let p = Process::unseen(pid, seq, uid.unwrap_or(0), cgroup_id.unwrap_or(0));
            self.procs.insert(pid, Box::new(p));
        }
        let p = &self.procs[&pid];
        if p.facts == Facts::Missing {
            let seq = p.exec_seq;
            let want = env_reader::Want::Process { basics: true };
            self.ask_process(pid, seq, want, env_reader::Queue::Urgent);
        }
        &self.procs[&pid]
    }

    /// `get_or_request` for a process the API just served (pidfd-attested, alive): one it has
    /// not seen gets its `Basics` at once (status, the exe link and cgroup, which never wait
    /// on the process's memory), the rest off the main loop. Its exec record may still be in
    /// the ring buffer's batch, so the table alone would leave the event without an exe.
    pub fn get_or_read_basics(&mut self, pid: u32) -> &Process {
        if !self.procs.contains_key(&pid) {
            self.add_from_basics(pid, env_reader::Queue::Urgent);
        }
        self.get_or_request(pid, None, None)
    }

    /// Cgroup path of a process, relative to the cgroup2 mount ("/a/b").
    pub fn cgroup_path(&mut self, cgroup_id: u64) -> String {
        self.cgroups.path(cgroup_id).unwrap_or_else(|| format!("cgroup-id:{cgroup_id}"))
    }

    fn resolve_exe(&mut self, pid: u32, filename: &str) -> String {
        if !Path::new(filename).is_absolute() {
            return resolve_exe(pid, filename);
        }
        if let Some(exe) = self.exe_cache.get(filename) {
            return exe.clone();
        }
        let exe = resolve_exe(pid, filename);
        if self.exe_cache.len() >= EXE_CACHE_MAX {
            self.exe_cache.clear();
        }
        self.exe_cache.insert(filename.to_string(), exe.clone());
        exe
    }

    /// The ancestors of `pid` (parent first), up to `max`, as (pid, exe), as far as the
    /// table knows them (never read from /proc here).
    pub fn parent_chain(&self, pid: u32, max: usize) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        let mut cur = self.procs.get(&pid).map(|p| p.ppid).unwrap_or(0);
        while cur > 1 && out.len() < max {
            let Some(p) = self.procs.get(&cur) else { break };
            out.push((cur, p.exe.clone()));
            let next = p.ppid;
            if next == cur {
                break;
            }
            cur = next;
        }
        out
    }

    /// Grant slots an exited process held (None while it runs: ask the kernel map).
    pub fn exited_grants(&self, pid: u32) -> Option<Vec<u32>> {
        self.procs.get(&pid).filter(|p| p.exited_at.is_some()).map(|p| p.grants.clone())
    }

    /// Drops processes that exited more than the grace period ago.
    pub fn purge(&mut self) {
        let now = Instant::now();
        self.procs.retain(|_, p| p.exited_at.is_none_or(|t| now.duration_since(t) < EXITED_GRACE));
        // After a storm the table keeps its peak capacity (its buckets hold whole entries):
        // give most of it back once it is mostly empty.
        if self.procs.capacity() > 1024 && self.procs.len() < self.procs.capacity() / 4 {
            self.procs.shrink_to(self.procs.len() * 2);
        }
    }
}

/// The exec'd file, with symlinks resolved (so `python3` reads as the file that ran).
/// A relative name is resolved through /proc while the process lives.
fn resolve_exe(pid: u32, filename: &str) -> String {
    if Path::new(filename).is_absolute() {
        return std::fs::canonicalize(filename)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| filename.to_string());
    }
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| filename.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(table: &mut ProcessTable, tgid: u32, argv: &[&str], truncated: bool) -> Vec<String> {
        table.apply(&Record::Exec {
            tgid,
            uid: 1000,
            cgroup_id: 1,
            filename: "/bin/true".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            argv_truncated: truncated,
        });
        table.procs[&tgid].cmdline.clone()
    }

    #[test]
    fn exec_records_enter_the_table_redacted() {
        let mut t = ProcessTable::new("/sys/fs/cgroup".into());
        t.fingerprint_key = Some(vec![7; 32]);
        let token = "ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A";
        let out = exec(&mut t, 4_000_001, &["tool", "--token", token], false);
        let r = Redactor::new(&[7; 32]);
        assert_eq!(out, ["tool", "--token", &r.marker(token.as_bytes())]);
        // Ordinary command lines are kept as they are; a cut is still marked.
        assert_eq!(exec(&mut t, 4_000_002, &["cat", "/etc/x"], true), ["cat", "/etc/x", "..."]);
        // A known secret value (the contents of a watched file), however it is quoted.
        t.set_secret_literals(crate::redact::literals_from_secret(b"s3cr3t-file-value\n"));
        let out = exec(&mut t, 4_000_003, &["sh", "-c", "tool 's3cr3t-'\"file-value\""], false);
        assert!(!out.join(" ").contains("file-value"), "{out:?}");
        // A fork copies the already redacted command line.
        t.apply(&Record::Fork {
            parent: 4_000_003,
            child: 4_000_004,
            uid: 1000,
            cgroup_id: 1,
            boot_ns: 1,
            grants: Vec::new(),
        });
        assert_eq!(t.procs[&4_000_004].cmdline, out);
        // The key changes: the redactor follows it.
        t.fingerprint_key = Some(vec![8; 32]);
        let out = exec(&mut t, 4_000_005, &["tool", token], false);
        assert_eq!(out[1], Redactor::new(&[8; 32]).marker(token.as_bytes()));
    }

    /// The environment is not read on the exec record: after the batch, by a reader thread,
    /// only for a process still running that image in scope; never for one that exited
    /// first. Static keys found are reported once applied.
    #[test]
    fn environments_are_read_after_the_batch_and_only_for_running_processes() {
        let Ok(mount) = crate::kernel::cgroup2_mount() else {
            eprintln!("skipped: no cgroup2 mount");
            return;
        };
        let mut t = ProcessTable::new(mount);
        t.fingerprint_key = Some(vec![7; 32]);
        let cgroup_id = current_cgroup(std::process::id())
            .and_then(|c| t.cgroups.id_of(&c))
            .expect("this process's cgroup resolves");
        let spawn = |secs: &str| {
            std::process::Command::new("sleep")
                .arg(secs)
                .env("DEPLOY_API_KEY", "value-never-kept")
                .env("ENFORCER_JOB_ID", "job-9")
                .spawn()
                .unwrap()
        };
        let (mut long, mut short) = (spawn("5"), spawn("0"));
        for c in [&long, &short] {
            t.apply(&Record::Exec {
                tgid: c.id(),
                uid: 0,
                cgroup_id,
                filename: "/bin/sleep".into(),
                argv: vec!["sleep".into()],
                argv_truncated: false,
            });
        }
        // Not read on the record itself.
        assert!(t.procs[&long.id()].env_credentials.is_empty());
        assert_eq!(t.procs[&long.id()].env, EnvState::Inherited);
        short.wait().unwrap();
        t.apply(&Record::Exit { tgid: short.id(), grants: Vec::new() });
        let t0 = std::time::Instant::now();
        let mut applied = t.env_pass("/");
        while applied.is_empty() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
            applied = t.env_pass("/");
        }
        let _ = long.kill();
        let _ = long.wait();
        assert_eq!(applied, [long.id()]);
        let p = &t.procs[&long.id()];
        assert_eq!(p.env, EnvState::Read);
        assert_eq!(p.job.as_ref().unwrap().id, "job-9");
        assert_eq!(p.env_credentials.len(), 1, "{:?}", p.env_credentials);
        assert_eq!(p.env_credentials[0].name, "DEPLOY_API_KEY");
        let c = t.env_counts();
        assert_eq!((c.read, c.exited_first, c.skipped, c.urgent), (1, 1, 0, 0), "{c:?}");
        // The short one alerts after its exit: known at once to be unknowable.
        assert!(matches!(t.env_for_alert(short.id()), EnvFacts::Unknown(_)));
    }

    /// A process the table has not seen (its records lost, or running before the daemon):
    /// the lookup reads nothing and returns at once with what the record said; what cannot
    /// block (`status`, the exe link) lands first; a command line that never comes (a FIFO
    /// stands for a process holding its `mmap_lock`) holds one reader thread, while another
    /// unseen process's facts land in full, redacted, with its environment.
    #[test]
    fn unseen_processes_are_read_off_the_main_loop() {
        let dir = tempfile::tempdir().unwrap();
        let token = "ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A";
        for pid in [20u32, 21] {
            let d = dir.path().join(pid.to_string());
            std::fs::create_dir(&d).unwrap();
            let status =
                format!("Name:\tx\nTgid:\t{pid}\nPPid:\t7\nUid:\t1000\t1000\t1000\t1000\n");
            std::fs::write(d.join("status"), status).unwrap();
            std::os::unix::fs::symlink(format!("/usr/bin/tool{pid}"), d.join("exe")).unwrap();
            std::fs::write(d.join("environ"), format!("ENFORCER_JOB_ID=j{pid}\0")).unwrap();
        }
        let stuck = dir.path().join("20/cmdline");
        nix::unistd::mkfifo(&stuck, nix::sys::stat::Mode::S_IRUSR).unwrap();
        std::fs::write(dir.path().join("21/cmdline"), format!("tool\0--token\0{token}\0")).unwrap();
        let mut t = ProcessTable::new("/sys/fs/cgroup".into());
        t.fingerprint_key = Some(vec![5; 32]);
        t.set_proc_root(dir.path().to_path_buf());
        let t0 = Instant::now();
        let p = t.get_or_request(20, Some(1000), Some(3)).clone();
        assert_eq!((p.uid, p.cgroup_id, p.exe.as_str(), &p.facts), (1000, 3, "", &Facts::Reading));
        assert!(p.facts_unknown().unwrap().contains("not read yet"));
        t.get_or_request(21, None, None);
        assert!(t0.elapsed() < Duration::from_millis(50), "lookups never wait");
        while t.get(21).unwrap().facts != Facts::Known && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
            t.env_pass("/");
        }
        let done = t.get(21).unwrap();
        assert_eq!((done.ppid, done.uid, done.exe.as_str()), (7, 1000, "/usr/bin/tool21"));
        let marker = Redactor::new(&[5; 32]).marker(token.as_bytes());
        assert_eq!(done.cmdline, ["tool", "--token", &marker]);
        assert_eq!(
            (done.env.clone(), done.job.as_ref().unwrap().id.as_str()),
            (EnvState::Read, "j21")
        );
        assert!(done.facts_unknown().is_none());
        // The stuck one: its basics are in, its command line is not, and asking again for an
        // alert neither waits nor asks twice.
        let held = t.get(20).unwrap();
        assert_eq!(
            (held.ppid, held.exe.as_str(), &held.facts),
            (7, "/usr/bin/tool20", &Facts::Reading)
        );
        assert!(matches!(t.env_for_alert(20), EnvFacts::Reading(_)));
        assert_eq!(t.env_counts().processes_read, 1);
        // Released: the read lands.
        drop(std::fs::OpenOptions::new().write(true).open(&stuck).unwrap());
        while t.get(20).unwrap().facts == Facts::Reading && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
            t.env_pass("/");
        }
        assert_eq!(t.get(20).unwrap().facts, Facts::Known);
        assert_eq!(t.get(20).unwrap().job.as_ref().unwrap().id, "j20");
        // A pid that does not exist: marked gone, purged with the exited.
        t.get_or_request(4_000_000, None, None);
        while t.get(4_000_000).unwrap().exited_at.is_none() && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(2));
            t.env_pass("/");
        }
        assert!(matches!(t.get(4_000_000).unwrap().facts, Facts::Unknown(_) | Facts::Reading));
        assert!(t.get(4_000_000).unwrap().exited_at.is_some());
    }

    #[test]
    fn procfs_argv_is_bounded_like_the_kernels() {
        let mut raw = b"tool\0".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 3000));
        let (argv, truncated) = procfs::split_argv(&raw);
        assert!(truncated);
        assert_eq!(argv.iter().map(|a| a.len() + 1).sum::<usize>(), procfs::ARGV_MAX + 1);
        let (argv, truncated) = procfs::split_argv(b"a\0b\0");
        assert_eq!((argv, truncated), (vec!["a".to_string(), "b".to_string()], false));
    }
}
