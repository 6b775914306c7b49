//! Kernel records and file opens in, events out: attribution -> decision -> event.
use std::net::IpAddr;

use chrono::Utc;

use crate::decide::{self, Decision, Use};
use crate::event::{self, DestinationRef, Event, FileRef, ProcessRef};
use crate::file::FileOpen;
use crate::kernel::records::{Connect, Record};
use crate::policy::{Mode, SecretKind};
use crate::proc::{ProcessTable, is_within};
use crate::store::EventStore;

pub struct Engine {
    pub table: ProcessTable,
    pub store: EventStore,
    pub mode: Mode,
    pub host: String,
    /// cgroup_root relative to the cgroup2 mount ("/" for the whole host).
    pub cgroup_scope: String,
    pub secret_kinds: std::collections::HashMap<String, SecretKind>,
    instance: String,
    seq: u64,
    pub counts: Counts,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Counts {
    pub events_total: u64,
    pub alerts_total: u64,
    pub file_opens: u64,
    pub connects: u64,
    pub execs: u64,
    pub malformed_records: u64,
    pub store_errors: u64,
}

impl Engine {
    pub fn new(table: ProcessTable, store: EventStore, mode: Mode, host: String, cgroup_scope: String) -> Self {
        // Unique per daemon start: boot-time nanoseconds and pid, so ids never repeat across restarts.
        let instance = format!("{:x}-{:x}", boot_ns(), std::process::id());
        Engine { table, store, mode, host, cgroup_scope, secret_kinds: Default::default(), instance, seq: 0, counts: Counts::default() }
    }

    pub fn on_record(&mut self, rec: Record) {
        self.table.apply(&rec);
        match rec {
            Record::Connect(c) => self.on_connect(c),
            Record::Exec { .. } => self.counts.execs += 1,
            Record::Malformed { len, kind } => {
                self.counts.malformed_records += 1;
                if self.counts.malformed_records <= 10 {
                    tracing::warn!(len, kind, "malformed kernel record ignored");
                }
            }
            _ => {}
        }
    }

    fn on_connect(&mut self, c: Connect) {
        self.counts.connects += 1;
        let (process, known) = self.process_ref(c.tgid, Some(c.cgroup_id));
        let d = decide::decide(&Use::Connect, known, self.mode);
        let dest = DestinationRef { ip: ip_string(c.ip), port: c.port, protocol: c.protocol.name() };
        let mut e = self.event("connect", &d, process);
        // When the kernel saw it, not when the daemon got to it.
        e.time = event::rfc3339(wall_time_of(c.boot_ns));
        e.destination = Some(dest);
        self.emit(e);
    }

    pub fn on_file_open(&mut self, f: FileOpen) {
        let (process, known) = self.process_ref(f.pid, None);
        if known && !is_within(&process.cgroup, &self.cgroup_scope) {
            return;
        }
        self.counts.file_opens += 1;
        let d = decide::decide(&Use::SecretOpen { secret: f.secret.clone() }, known, self.mode);
        let kind = self.secret_kinds.get(&f.secret).copied().unwrap_or(SecretKind::CredentialsFile);
        let mut e = self.event("file_open", &d, process);
        e.mitre = vec![match kind {
            SecretKind::PrivateKey => "T1552.004".into(),
            _ => "T1552.001".into(),
        }];
        e.file = Some(FileRef { path: f.path, dev: f.dev, ino: f.ino, secret: f.secret });
        self.emit(e);
    }

    /// An event about the agent itself (started, stopped, lost events).
    pub fn agent_event(&mut self, kind: &str, severity: &str, message: String) {
        let (process, _) = self.process_ref(std::process::id(), None);
        let d = Decision { verdict: decide::Verdict::Allowed, action: decide::Action::Allowed, decision_path: vec![] };
        let mut e = self.event(kind, &d, process);
        e.severity = severity.into();
        e.message = Some(message);
        self.emit(e);
    }

    fn process_ref(&mut self, pid: u32, cgroup_id: Option<u64>) -> (ProcessRef, bool) {
        match self.table.get_or_load(pid).cloned() {
            Some(p) => {
                let cgroup = self.table.cgroup_path(cgroup_id.unwrap_or(p.cgroup_id));
                (ProcessRef { pid, ppid: p.ppid, uid: p.uid, exe: p.exe, cmdline: event::join_cmdline(&p.cmdline), cgroup }, true)
            }
            None => {
                let cgroup = cgroup_id.map(|id| self.table.cgroup_path(id)).unwrap_or_default();
                (ProcessRef { pid, cgroup, ..Default::default() }, false)
            }
        }
    }

    fn event(&mut self, kind: &str, d: &Decision, process: ProcessRef) -> Event {
        self.seq += 1;
        let alert = d.verdict != decide::Verdict::Allowed;
        Event {
            schema: event::SCHEMA.into(),
            id: format!("{}-{}", self.instance, self.seq),
            time: event::rfc3339(Utc::now()),
            host: self.host.clone(),
            kind: kind.into(),
            verdict: d.verdict.as_str().into(),
            action: d.action.as_str().into(),
            mode: self.mode.to_string(),
            process,
            file: None,
            destination: None,
            grant: None,
            decision_path: d.decision_path.clone(),
            mitre: vec![],
            severity: if alert { "high" } else { "info" }.into(),
            message: None,
        }
    }

    fn emit(&mut self, e: Event) {
        self.counts.events_total += 1;
        if e.verdict != "allowed" {
            self.counts.alerts_total += 1;
        }
        if let Err(err) = self.store.append(&e) {
            self.counts.store_errors += 1;
            tracing::error!("cannot store event {}: {err:#}", e.id);
        }
    }

    pub fn flush(&mut self) {
        if let Err(err) = self.store.flush() {
            self.counts.store_errors += 1;
            tracing::error!("cannot flush events: {err:#}");
        }
    }
}

fn ip_string(ip: IpAddr) -> String {
    ip.to_string()
}

/// Converts a boot-clock timestamp (bpf_ktime_get_boot_ns) to wall-clock time.
fn wall_time_of(boot: u64) -> chrono::DateTime<Utc> {
    let now = Utc::now();
    let age = boot_ns().saturating_sub(boot);
    now - chrono::Duration::nanoseconds(age.min(i64::MAX as u64) as i64)
}

fn boot_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
