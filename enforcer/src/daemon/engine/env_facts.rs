//! The last stage before the outbox for alerts: their process's own environment facts (CI
//! job, static keys) and, for a process the lineage records never showed (running before the
//! daemon, or its records lost), its exe, ppid and command line. Both are read off the main
//! loop (`crate::proc::env_reader`); an alert whose process's read is still out waits here,
//! never in a call: it is written when the read lands, or after `WAIT` with `env_unknown`
//! (and `facts_unknown`) saying why. Alerts of one process leave in the order they were
//! made; none is ever dropped (past `MAX_HELD` they are written at once, marked unknown).
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::event::{self, Event};
use crate::proc::{EnvFacts, EnvState, Facts, ProcessTable};

/// Longest an alert waits for its process's environment.
pub const WAIT: Duration = Duration::from_millis(200);
/// Alerts held at once (a few KB of heap each); past it they are written without waiting.
const MAX_HELD: usize = 1024;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct HeldCounts {
    /// Alerts that waited for an environment read.
    pub alerts_held: u64,
    /// Of them, written without it after `WAIT`.
    pub alerts_env_late: u64,
    pub alerts_held_max: usize,
}

#[derive(Default)]
pub struct EnvStage {
    /// (alert, exec generation its facts are for, deadline), oldest first.
    held: VecDeque<(Event, u64, Instant)>,
    /// Alerts held per pid: a later alert of the same process queues behind them.
    by_pid: HashMap<u32, usize>,
    pub counts: HeldCounts,
}

impl EnvStage {
    pub fn waiting(&self) -> usize {
        self.held.len()
    }

    /// `e` ready for the outbox now (its facts filled in or marked unknown), or None when it
    /// is held for a read that is out.
    pub fn admit(&mut self, table: &mut ProcessTable, mut e: Event) -> Option<Event> {
        let pid = e.process.pid;
        if e.verdict == "allowed" || pid == 0 {
            return Some(e);
        }
        let queued = self.by_pid.contains_key(&pid);
        let seq = match table.env_for_alert(pid) {
            EnvFacts::Reading(seq) => seq,
            _ if queued => table.get(pid).map_or(0, |p| p.exec_seq),
            facts => {
                fill(table, &mut e, facts);
                return Some(e);
            }
        };
        if self.held.len() >= MAX_HELD {
            fill(
                table,
                &mut e,
                EnvFacts::Unknown("too many alerts waiting for environment reads".into()),
            );
            return Some(e);
        }
        self.held.push_back((e, seq, Instant::now() + WAIT));
        *self.by_pid.entry(pid).or_default() += 1;
        self.counts.alerts_held += 1;
        self.counts.alerts_held_max = self.counts.alerts_held_max.max(self.held.len());
        None
    }

    /// Held alerts whose facts are in (or overdue; all of them when `all`), oldest first.
    pub fn ready(&mut self, table: &ProcessTable, all: bool) -> Vec<Event> {
        if self.held.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.held.len());
        for (mut e, seq, deadline) in std::mem::take(&mut self.held) {
            let pid = e.process.pid;
            let facts = match table.get(pid) {
                Some(p) if p.exec_seq != seq => EnvFacts::Unknown(
                    "the process exec'd again before its environment was read".into(),
                ),
                Some(p) if p.facts == Facts::Reading => EnvFacts::Reading(seq),
                Some(p) => match &p.env {
                    EnvState::Read => EnvFacts::Known,
                    EnvState::Unknown(why) => EnvFacts::Unknown(why.clone()),
                    EnvState::Inherited if p.exited_at.is_some() => EnvFacts::Unknown(
                        "the process exited before its environment was read".into(),
                    ),
                    EnvState::Reading | EnvState::Inherited => EnvFacts::Reading(seq),
                },
                None => EnvFacts::Unknown(
                    "the process left the table before its environment was read".into(),
                ),
            };
            let facts = match facts {
                EnvFacts::Reading(_) if all || now >= deadline => {
                    self.counts.alerts_env_late += 1;
                    late_facts(table, &mut e, seq);
                    EnvFacts::Unknown(format!(
                        "the environment was not read within {} ms",
                        WAIT.as_millis()
                    ))
                }
                EnvFacts::Reading(_) => {
                    keep.push_back((e, seq, deadline));
                    continue;
                }
                f => f,
            };
            fill(table, &mut e, facts);
            if let Some(n) = self.by_pid.get_mut(&pid) {
                *n -= 1;
                if *n == 0 {
                    self.by_pid.remove(&pid);
                }
            }
            out.push(e);
        }
        self.held = keep;
        out
    }
}

/// An alert made before its process's /proc facts were in gets what has landed since (only
/// from the entry it was made for).
fn refresh_process(table: &ProcessTable, e: &mut Event) {
    if e.process.facts_unknown.is_none() {
        return;
    }
    let pid = e.process.pid;
    let Some(p) = table.get(pid) else { return };
    if p.ppid != 0 {
        e.process.ppid = p.ppid;
    }
    if !p.exe.is_empty() {
        e.process.exe = p.exe.clone();
    }
    if !p.cmdline.is_empty() {
        e.process.cmdline = event::join_cmdline(&p.cmdline);
    }
    e.process.uid = p.uid;
    if e.process.parent_chain.is_empty() {
        e.process.parent_chain = table
            .parent_chain(pid, 8)
            .into_iter()
            .map(|(pid, exe)| event::Ancestor { pid, exe })
            .collect();
    }
    e.process.facts_unknown = p.facts_unknown();
}

/// Past the deadline: what landed of the facts, and why the rest is missing.
fn late_facts(table: &ProcessTable, e: &mut Event, seq: u64) {
    let Some(p) = table.get(e.process.pid).filter(|p| p.exec_seq == seq) else { return };
    if p.facts != Facts::Reading {
        return;
    }
    refresh_process(table, e);
    e.process.facts_unknown = Some(format!(
        "the command line was not read within {} ms (the process was not in the lineage \
         records: running before the daemon started, or its records were lost; its memory is \
         read off the main loop){}",
        WAIT.as_millis(),
        if p.exe.is_empty() { "; exe and ppid not read either" } else { "" }
    ));
}

/// The process's own job and keys when known; else `env_unknown` (the inherited values the
/// event was made with stand). An alert made before its process's /proc facts were in gets
/// what has landed since.
fn fill(table: &ProcessTable, e: &mut Event, facts: EnvFacts) {
    if table.get(e.process.pid).is_some_and(|p| p.facts != Facts::Reading) {
        refresh_process(table, e);
    }
    match facts {
        EnvFacts::Known => {
            if let Some(p) = table.get(e.process.pid) {
                e.process.job = p.job.clone();
                e.process.env_credentials = p.env_credentials.clone();
            }
        }
        EnvFacts::Unknown(why) => e.process.env_unknown = Some(why),
        EnvFacts::Reading(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ProcessRef;
    use crate::records::Record;

    fn alert(pid: u32, id: &str) -> Event {
        Event {
            schema: crate::event::SCHEMA.into(),
            id: id.into(),
            time: String::new(),
            host: String::new(),
            kind: "file_open".into(),
            verdict: "no_grant".into(),
            action: "alerted".into(),
            mode: "monitor".into(),
            process: ProcessRef { pid, ..Default::default() },
            file: None,
            destination: None,
            grant: None,
            socket: None,
            ipc: None,
            decision_path: Vec::new(),
            secrets: Vec::new(),
            credentials: Vec::new(),
            mitre: Vec::new(),
            severity: "high".into(),
            message: None,
        }
    }

    fn exec(t: &mut ProcessTable, pid: u32) {
        t.apply(&Record::Exec {
            tgid: pid,
            uid: 0,
            cgroup_id: 1,
            filename: "/bin/true".into(),
            argv: vec!["true".into()],
            argv_truncated: false,
        });
    }

    /// Alerts about processes the lineage records never showed: one whose command line never
    /// comes (a FIFO stands for a process holding its `mmap_lock`) is written after `WAIT`
    /// with the exe and ppid that could be read and `facts_unknown`; another's is written as
    /// soon as its facts land, with its command line; admitting never waits.
    #[test]
    fn an_unseen_process_whose_command_line_hangs_delays_only_its_own_alert() {
        let dir = tempfile::tempdir().unwrap();
        for pid in [30u32, 31] {
            let d = dir.path().join(pid.to_string());
            std::fs::create_dir(&d).unwrap();
            let status = format!("Tgid:\t{pid}\nPPid:\t9\nUid:\t5\t5\t5\t5\n");
            std::fs::write(d.join("status"), status).unwrap();
            std::os::unix::fs::symlink(format!("/bin/tool{pid}"), d.join("exe")).unwrap();
            std::fs::write(d.join("environ"), "ENFORCER_JOB_ID=j\0").unwrap();
        }
        let stuck = dir.path().join("30/cmdline");
        nix::unistd::mkfifo(&stuck, nix::sys::stat::Mode::S_IRUSR).unwrap();
        std::fs::write(dir.path().join("31/cmdline"), "tool31\0--flag\0").unwrap();
        let mut t = ProcessTable::new("/sys/fs/cgroup".into());
        t.fingerprint_key = Some(vec![3; 32]);
        t.set_proc_root(dir.path().to_path_buf());
        let mut s = EnvStage::default();
        let t0 = Instant::now();
        let mut made = |pid: u32, id: &str| {
            let mut e = alert(pid, id);
            e.process.facts_unknown = t.get_or_request(pid, Some(5), None).facts_unknown();
            e
        };
        let (a, b) = (made(30, "a"), made(31, "b"));
        assert!(s.admit(&mut t, a).is_none());
        assert!(s.admit(&mut t, b).is_none());
        assert!(t0.elapsed() < Duration::from_millis(20), "admitting never waits");
        let mut out = Vec::new();
        while out.len() < 2 && t0.elapsed() < Duration::from_secs(2) {
            t.env_pass("/");
            out.extend(s.ready(&t, false));
            std::thread::sleep(Duration::from_millis(2));
        }
        let (b, a) = (&out[0], &out[1]);
        assert_eq!((b.id.as_str(), b.process.cmdline.as_str()), ("b", "tool31 --flag"));
        assert_eq!((b.process.exe.as_str(), b.process.ppid), ("/bin/tool31", 9));
        assert!(b.process.facts_unknown.is_none() && b.process.env_unknown.is_none(), "{b:?}");
        assert_eq!(a.id, "a");
        assert!(t0.elapsed() >= WAIT);
        assert_eq!(
            (a.process.exe.as_str(), a.process.ppid, a.process.cmdline.as_str()),
            ("/bin/tool30", 9, "")
        );
        let why = a.process.facts_unknown.as_deref().unwrap();
        assert!(why.contains("not read within 200 ms"), "{why}");
        assert!(a.process.env_unknown.is_some());
        drop(std::fs::OpenOptions::new().write(true).open(&stuck).unwrap());
    }

    /// The attacker's process makes its environment read hang (a FIFO stands for a page that
    /// never faults in): its alert waits `WAIT` and is written marked unknown; another
    /// process's alerts, made after it, are written as soon as their read lands, with the
    /// job; nothing ever blocks the caller, and one process's alerts keep their order.
    #[test]
    fn a_stuck_environment_read_delays_only_its_own_alert() {
        let dir = tempfile::tempdir().unwrap();
        let stuck = dir.path().join("10");
        std::fs::create_dir(&stuck).unwrap();
        nix::unistd::mkfifo(&stuck.join("environ"), nix::sys::stat::Mode::S_IRUSR).unwrap();
        std::fs::create_dir(dir.path().join("11")).unwrap();
        std::fs::write(dir.path().join("11/environ"), "ENFORCER_JOB_ID=job-11\0").unwrap();
        let mut t = ProcessTable::new("/sys/fs/cgroup".into());
        t.fingerprint_key = Some(vec![3; 32]);
        t.set_proc_root(dir.path().to_path_buf());
        exec(&mut t, 10);
        exec(&mut t, 11);
        let mut s = EnvStage::default();
        let t0 = Instant::now();
        assert!(s.admit(&mut t, alert(10, "a")).is_none());
        assert!(s.admit(&mut t, alert(11, "b")).is_none());
        assert!(s.admit(&mut t, alert(11, "c")).is_none());
        assert!(t0.elapsed() < Duration::from_millis(20), "admitting never waits");
        let mut out = Vec::new();
        while out.len() < 2 && t0.elapsed() < Duration::from_secs(2) {
            t.env_pass("/");
            out.extend(s.ready(&t, false));
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(t0.elapsed() < WAIT, "{:?}", t0.elapsed());
        assert_eq!(out.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        for e in &out {
            assert_eq!(e.process.job.as_ref().unwrap().id, "job-11");
            assert!(e.process.env_unknown.is_none());
        }
        while out.len() < 3 && t0.elapsed() < Duration::from_secs(2) {
            t.env_pass("/");
            out.extend(s.ready(&t, false));
            std::thread::sleep(Duration::from_millis(5));
        }
        let late = &out[2];
        assert_eq!(late.id, "a");
        assert!(t0.elapsed() >= WAIT);
        assert!(late.process.job.is_none());
        assert!(late.process.env_unknown.as_deref().unwrap().contains("not read within"));
        assert_eq!(s.counts.alerts_env_late, 1);
        // A later alert of the process with the stuck read does not wait again.
        let again = s.admit(&mut t, alert(10, "d"));
        assert!(again.is_none(), "still reading: held until the deadline");
        drop(std::fs::OpenOptions::new().write(true).open(stuck.join("environ")).unwrap());
        let mut rest = Vec::new();
        while rest.is_empty() && t0.elapsed() < Duration::from_secs(2) {
            t.env_pass("/");
            rest.extend(s.ready(&t, false));
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(rest[0].id, "d");
        assert!(rest[0].process.env_unknown.is_none(), "{:?}", rest[0].process);
    }
}
