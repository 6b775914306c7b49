//! The daemon's view of processes: fed by the kernel's lineage records (so short-lived
//! processes keep their exe and cmdline after they exit), seeded from /proc at start for
//! processes that were already running.
pub mod env;
mod procfs;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use crate::cgroup::is_within;
pub use procfs::{current_cgroup, start_ns, subtree_since};

use crate::cgroup::CgroupResolver;
use crate::records::Record;

/// How long an exited process stays resolvable: its last file or connect events may still
/// be queued behind its exit record.
const EXITED_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, serde::Serialize)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub exe: String,
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
    #[serde(skip)]
    pub exited_at: Option<Instant>,
}

pub struct ProcessTable {
    procs: HashMap<u32, Process>,
    /// Key for environment-credential fingerprints (None: environments are not read).
    pub fingerprint_key: Option<Vec<u8>>,
    pub cgroups: CgroupResolver,
    /// exec'd filename -> canonical path; saves the path walk on every exec of the same file.
    exe_cache: HashMap<String, String>,
}

/// Bound on the exe cache; it is simply cleared when full.
const EXE_CACHE_MAX: usize = 4096;

impl ProcessTable {
    pub fn new(cgroup_mount: PathBuf) -> Self {
        ProcessTable {
            procs: HashMap::new(),
            fingerprint_key: None,
            cgroups: CgroupResolver::new(cgroup_mount),
            exe_cache: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// Adds every process in /proc that the lineage records have not told us about.
    pub fn seed_from_proc(&mut self) {
        for pid in procfs::pids() {
            if !self.procs.contains_key(&pid)
                && let Some(mut p) = procfs::read(pid, &mut self.cgroups)
            {
                if let Some(info) = self.fingerprint_key.as_deref().and_then(|k| env::read(pid, k))
                {
                    p.job = info.job;
                    p.env_credentials = info.credentials;
                }
                self.procs.insert(pid, p);
            }
        }
    }

    pub fn apply(&mut self, rec: &Record) {
        match rec {
            Record::Fork { parent, child, uid, cgroup_id, boot_ns, grants } => {
                let base = self.get_or_load(*parent).cloned();
                let p = match base {
                    Some(parent_proc) => Process {
                        pid: *child,
                        ppid: *parent,
                        uid: *uid,
                        cgroup_id: *cgroup_id,
                        start_ns: *boot_ns,
                        grants: grants.clone(),
                        exited_at: None,
                        ..parent_proc
                    },
                    None => Process {
                        pid: *child,
                        ppid: *parent,
                        uid: *uid,
                        exe: String::new(),
                        cmdline: Vec::new(),
                        cgroup_id: *cgroup_id,
                        start_ns: *boot_ns,
                        grants: grants.clone(),
                        job: None,
                        env_credentials: Vec::new(),
                        exited_at: None,
                    },
                };
                self.procs.insert(*child, p);
            }
            Record::Exec { tgid, uid, cgroup_id, filename, argv, argv_truncated, .. } => {
                let exe = self.resolve_exe(*tgid, filename);
                let mut cmdline = argv.clone();
                if *argv_truncated {
                    cmdline.push("...".into());
                }
                let (ppid, start_ns, grants, mut job, mut env_credentials) =
                    match self.procs.get(tgid) {
                        Some(p) => (
                            p.ppid,
                            p.start_ns,
                            p.grants.clone(),
                            p.job.clone(),
                            p.env_credentials.clone(),
                        ),
                        None => (procfs::ppid(*tgid).unwrap_or(0), 0, Vec::new(), None, Vec::new()),
                    };
                // The new image's environment (gone already for very short-lived processes:
                // then what the parent had, copied at fork, stands).
                if let Some(info) =
                    self.fingerprint_key.as_deref().and_then(|k| env::read(*tgid, k))
                {
                    job = info.job.or(job);
                    env_credentials = info.credentials;
                }
                self.procs.insert(
                    *tgid,
                    Process {
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
                        exited_at: None,
                    },
                );
            }
            Record::Exit { tgid, grants } => {
                if let Some(p) = self.procs.get_mut(tgid) {
                    p.exited_at = Some(Instant::now());
                    p.grants = grants.clone();
                }
            }
            Record::Connect(c) => {
                // A process may have moved cgroups since exec; the hook saw the current one.
                if let Some(p) = self.procs.get_mut(&c.tgid) {
                    p.cgroup_id = c.cgroup_id;
                }
            }
            Record::Malformed { .. } => {}
        }
    }

    /// The process, from the table or (when lineage never saw it) from /proc.
    pub fn get_or_load(&mut self, pid: u32) -> Option<&Process> {
        if !self.procs.contains_key(&pid) {
            let p = procfs::read(pid, &mut self.cgroups)?;
            self.procs.insert(pid, p);
        }
        self.procs.get(&pid)
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

    /// The ancestors of `pid` (parent first), up to `max`, as (pid, exe).
    pub fn parent_chain(&mut self, pid: u32, max: usize) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        let mut cur = self.procs.get(&pid).map(|p| p.ppid).unwrap_or(0);
        while cur > 1 && out.len() < max {
            let Some(p) = self.get_or_load(cur) else { break };
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
