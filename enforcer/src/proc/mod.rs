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
    #[serde(skip)]
    pub exited_at: Option<Instant>,
}

pub struct ProcessTable {
    procs: HashMap<u32, Process>,
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
        }
    }

    pub fn len(&self) -> usize {
        self.procs.len()
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

    /// A process read from /proc, its command line redacted.
    fn load(&mut self, pid: u32) -> Option<Process> {
        let (mut p, truncated) = procfs::read(pid, &mut self.cgroups)?;
        p.cmdline = self.redact_cmdline(&p.cmdline, truncated);
        Some(p)
    }

    /// Adds every process in /proc that the lineage records have not told us about.
    pub fn seed_from_proc(&mut self) {
        for pid in procfs::pids() {
            if !self.procs.contains_key(&pid)
                && let Some(mut p) = self.load(pid)
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
                let cmdline = self.redact_cmdline(argv, *argv_truncated);
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

    /// The process, from the table or (when lineage never saw it) from /proc.
    pub fn get_or_load(&mut self, pid: u32) -> Option<&Process> {
        if !self.procs.contains_key(&pid) {
            let p = self.load(pid)?;
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
