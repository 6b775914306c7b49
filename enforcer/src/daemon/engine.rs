//! Kernel records and file opens in, events out: attribution -> decision -> event.
use std::net::IpAddr;

use chrono::Utc;

use std::sync::{Arc, Mutex};

use crate::decide::{self, Decision, HeldGrant, Use, Verdict};
use crate::event::{self, DestinationRef, Event, FileRef, GrantRef, ProcessRef};
use crate::mint::model::Grant;
use crate::mint::registry::{GrantChange, Registry};
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
    pub registry: Arc<Mutex<Registry>>,
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
    /// Connects where decide.rs and the kernel disagreed (should stay 0).
    pub decision_mismatches: u64,
}

impl Engine {
    pub fn new(table: ProcessTable, store: EventStore, mode: Mode, host: String, cgroup_scope: String, registry: Arc<Mutex<Registry>>) -> Self {
        // Unique per daemon start: boot-time nanoseconds and pid, so ids never repeat across restarts.
        let instance = format!("{:x}-{:x}", boot_ns(), std::process::id());
        Engine { table, store, mode, host, cgroup_scope, secret_kinds: Default::default(), registry, instance, seq: 0, counts: Counts::default() }
    }

    pub fn on_record(&mut self, rec: Record) {
        self.table.apply(&rec);
        match &rec {
            Record::Fork { grants, .. } if !grants.is_empty() => self.registry.lock().unwrap().on_fork(grants),
            Record::Exit { grants, .. } if !grants.is_empty() => self.registry.lock().unwrap().on_exit(grants),
            _ => {}
        }
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
        let when = wall_time_of(c.boot_ns);
        let held = if c.verdict == enforcer_common::verdict::NO_GRANT_HELD {
            Vec::new()
        } else {
            let reg = self.registry.lock().unwrap();
            let mut h = reg.held_by(c.tgid);
            if h.is_empty() && c.grant_slot != 0 {
                // The process is gone already; judge against the grant the kernel used.
                h = reg.held_slots(&[c.grant_slot]);
            }
            h
        };
        let mut d = decide::decide(&Use::Connect { ip: c.ip, port: c.port }, known, &held, self.mode, when);
        if let Some(kv) = kernel_verdict(c.verdict) {
            if kv != d.verdict {
                // The kernel's verdict is what happened; say where the two disagreed.
                self.counts.decision_mismatches += 1;
                tracing::warn!(pid = c.tgid, kernel = kv.as_str(), userspace = d.verdict.as_str(), "connect verdict mismatch");
                d.decision_path.push(format!("kernel decided {} (userspace: {})", kv.as_str(), d.verdict.as_str()));
                d.verdict = kv;
            } else {
                d.decision_path.push("kernel verdict agrees".into());
            }
        }
        let dest = DestinationRef { ip: ip_string(c.ip), port: c.port, protocol: c.protocol.name() };
        let mut e = self.event("connect", &d, process);
        e.grant = grant_ref(&d, &held);
        // When the kernel saw it, not when the daemon got to it.
        e.time = event::rfc3339(when);
        e.destination = Some(dest);
        self.emit(e);
    }

    /// `held_now`: the kernel map's answer for the opener, looked up before the last ring
    /// drain (so if it is empty because the process exited, its exit record is processed).
    pub fn on_file_open(&mut self, f: FileOpen, held_now: Vec<HeldGrant>) {
        let (process, known) = self.process_ref(f.pid, None);
        if known && !is_within(&process.cgroup, &self.cgroup_scope) {
            return;
        }
        self.counts.file_opens += 1;
        let held = match (held_now.is_empty(), self.table.exited_grants(f.pid)) {
            // Gone before we got to its open: the kernel reported its grants at exit.
            (true, Some(slots)) => self.registry.lock().unwrap().held_slots(&slots),
            _ => held_now,
        };
        let d = decide::decide(&Use::SecretOpen { secret: f.secret.clone() }, known, &held, self.mode, Utc::now());
        let kind = self.secret_kinds.get(&f.secret).copied().unwrap_or(SecretKind::CredentialsFile);
        let mut e = self.event("file_open", &d, process);
        e.grant = grant_ref(&d, &held);
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
        let d = Decision { verdict: Verdict::Allowed, action: decide::Action::Allowed, decision_path: vec![], grant: None, expired_for_ms: None };
        let mut e = self.event(kind, &d, process);
        e.severity = severity.into();
        e.message = Some(message);
        self.emit(e);
    }

    /// A grant's life: issued, expired, revoked, ended. The process is the grant's subject.
    pub fn on_grant_change(&mut self, change: GrantChange) {
        let (kind, g, message) = match change {
            GrantChange::Issued(g) => {
                let m = format!("grant {} issued for intent {} to pid {} until {}{}", g.id, g.intent, g.subject.pid, g.expires_at.to_rfc3339(), g.ttl_clamped_from.as_ref().map(|c| format!(" ({c})")).unwrap_or_default());
                ("grant_issued", g, m)
            }
            GrantChange::Expired(g) => {
                let m = format!("grant {} (intent {}) expired", g.id, g.intent);
                ("grant_expired", g, m)
            }
            GrantChange::Revoked(g, why) => {
                let m = format!("grant {} (intent {}) revoked: {why}", g.id, g.intent);
                ("grant_revoked", g, m)
            }
            GrantChange::Ended(g) => {
                let m = format!("grant {} (intent {}) ended: every process holding it exited", g.id, g.intent);
                ("grant_ended", g, m)
            }
        };
        let (mut process, _) = self.process_ref(g.subject.pid, None);
        if process.exe.is_empty() {
            process.exe = g.subject.exe.clone();
            process.uid = g.subject.uid;
        }
        let d = Decision { verdict: Verdict::Allowed, action: decide::Action::Allowed, decision_path: vec![], grant: None, expired_for_ms: None };
        let mut e = self.event(kind, &d, process);
        e.grant = Some(grant_ref_of(&g, None));
        e.secrets = g.secrets.clone();
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
            secrets: vec![],
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

fn kernel_verdict(v: u8) -> Option<Verdict> {
    use enforcer_common::verdict as kv;
    match v {
        kv::ALLOWED => Some(Verdict::Allowed),
        kv::EXPIRED => Some(Verdict::Expired),
        kv::REVOKED => Some(Verdict::Revoked),
        kv::OUT_OF_INTENT => Some(Verdict::OutOfIntent),
        _ => None,
    }
}

fn grant_ref(d: &Decision, held: &[HeldGrant]) -> Option<GrantRef> {
    let g = held.get(d.grant?)?;
    Some(GrantRef { id: g.id.clone(), intent: g.intent.clone(), expires_at: event::rfc3339(g.expires_at), expired_for_ms: d.expired_for_ms })
}

fn grant_ref_of(g: &Grant, expired_for_ms: Option<u64>) -> GrantRef {
    GrantRef { id: g.id.clone(), intent: g.intent.clone(), expires_at: event::rfc3339(g.expires_at), expired_for_ms }
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
