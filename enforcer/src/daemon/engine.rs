//! Kernel records and file opens in, events out: attribution -> decision -> event.
use std::net::IpAddr;

use chrono::Utc;

use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use super::replay::{kernel_judgement, same_judgement, slot_of};
use crate::act::{self, Actor};
use crate::decide::{self, Action, Decision, HeldGrant, SubjectState, Use, Verdict};
use crate::event::{self, DestinationRef, Event, FileRef, GrantRef, ProcessRef};
use crate::file::FileOpen;
use crate::mint::model::Grant;
use crate::mint::registry::{GrantChange, Notice};
use crate::mint::view::ViewCell;
use crate::mint::writer::LedgerTx;
use crate::policy::{Mode, SecretKind};
use crate::proc::{ProcessTable, is_within};
use crate::records::{Connect, IpcUse, Record, SocketUse};
use crate::store::EventStore;
use dns::learned_name;

/// Judged socket creations: names and the decision path.
mod credential;
/// Addresses learned by name in connect decisions; the DNS stub's `dns` events.
mod dns;
/// Alerts' environment facts, read off the main loop.
pub mod env_facts;
/// Executable hashes for alerts, off the decision path.
pub mod exe_hash;
/// Refused grant requests as events.
mod refusal;
/// Sampling of routine allowed connects.
mod routine;
mod socket;

/// Unix-socket use by processes holding secrets (alerts).
mod ipc;

/// Secret opens the BPF-LSM program judged.
mod kernel_open;

use exe_hash::{ExeHash, ExeHasher};

/// (job or cgroup, variable, fingerprint) pairs remembered for one-event-each reporting;
/// past it the set is cleared (a variable may then be reported once more).
const MAX_ENV_SEEN: usize = 16_384;
/// Processes whose alert facts (ancestry, exe hash) are cached.
const MAX_ALERT_FACTS: usize = 8192;

pub struct Engine {
    pub table: ProcessTable,
    pub store: EventStore,
    pub mode: Mode,
    pub host: String,
    /// cgroup_root relative to the cgroup2 mount ("/" for the whole host).
    pub cgroup_scope: String,
    pub secret_kinds: std::collections::HashMap<String, SecretKind>,
    pub grants: GrantLinks,
    /// Secrets' directories as the kernel names them (BPF-LSM backend), to name the files
    /// in its records.
    pub kernel_dirs: std::collections::HashMap<enforcer_common::InodeKey, std::path::PathBuf>,
    pub exe_hashes: ExeHasher,
    /// Alerts waiting for their process's environment (after their exe hash).
    pub env_stage: env_facts::EnvStage,
    /// pid -> (exe, parent chain, exe hash) for alerts; dropped when the process exits.
    alert_facts: std::collections::HashMap<u32, (String, Vec<event::Ancestor>, ExeHash)>,
    /// (job or cgroup, variable, fingerprint) already reported: one event each. Kept as a
    /// 64-bit hash under a per-daemon random key (8 bytes an entry instead of three
    /// strings: an exec storm with changing values fills it at the environment read rate).
    env_seen: std::collections::HashSet<u64>,
    env_seen_key: std::hash::RandomState,
    instance: String,
    seq: u64,
    pub counts: Counts,
    refusals: refusal::RefusalLog,
    routine: routine::Routine,
    /// Addresses the DNS stub learned (replays judge on them; events name them).
    pub learned: Arc<crate::dns::learned::LearnedTable>,
}

/// The engine's ties to the grants, none of which waits on the registry: the published
/// snapshot decisions read, enforcement on the kernel maps, lifecycle notices for the
/// registry, and use records for the ledger writer.
pub struct GrantLinks {
    pub view: Arc<ViewCell>,
    pub act: Actor,
    pub notices: UnboundedSender<Notice>,
    pub ledger: LedgerTx,
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
    /// Judged socket creations (raw, ping, SCTP, ... by judged processes).
    pub sockets: u64,
    /// Secret opens answered with the safe default because the decision deadline passed.
    pub file_opens_late: u64,
    /// Grant requests refused (each a `mint_refused` event, at most one per uid and error
    /// code per second).
    pub grant_refusals: u64,
    /// Allowed connects counted in a `connects_summarised` event instead of one each.
    pub connects_folded: u64,
}

impl Engine {
    pub fn new(
        table: ProcessTable,
        store: EventStore,
        mode: Mode,
        host: String,
        cgroup_scope: String,
        grants: GrantLinks,
        exe_hash_max_bytes: u64,
    ) -> Self {
        // Unique per daemon start: boot-time nanoseconds and pid, so ids never repeat across restarts.
        let instance = format!("{:x}-{:x}", boot_ns(), std::process::id());
        Engine {
            table,
            store,
            mode,
            host,
            cgroup_scope,
            secret_kinds: Default::default(),
            grants,
            kernel_dirs: Default::default(),
            exe_hashes: ExeHasher::new(exe_hash_max_bytes),
            env_stage: Default::default(),
            alert_facts: Default::default(),
            env_seen: Default::default(),
            env_seen_key: Default::default(),
            instance,
            seq: 0,
            counts: Counts::default(),
            refusals: Default::default(),
            routine: Default::default(),
            learned: Arc::new(crate::dns::learned::LearnedTable::new(None)),
        }
    }

    pub fn on_record(&mut self, rec: Record) {
        self.table.apply(&rec);
        match &rec {
            Record::Fork { grants, .. } if !grants.is_empty() => {
                let _ = self.grants.notices.send(Notice::Fork(grants.clone()));
            }
            Record::Exit { grants, .. } if !grants.is_empty() => {
                let _ = self.grants.notices.send(Notice::Exit(grants.clone()));
            }
            _ => {}
        }
        if let Record::Exit { tgid, .. } = &rec {
            self.alert_facts.remove(tgid);
        }
        match rec {
            Record::Connect(c) => self.on_connect(c),
            Record::Socket(s) => self.on_socket(s),
            Record::Ipc(i) => self.on_ipc(i),
            Record::FileOpen(o) => self.on_kernel_open(o),
            // Its environment is read later, off the main loop (`env_pass`).
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
        let when = wall_time_of(c.boot_ns);
        let view = self.grants.view.load();
        // Replay the kernel's judgement on the facts it judged: the PROC_GRANTS entry the
        // record carries and the grants as they stood at the record's time (ended ones
        // included), with the kernel's own deadlines and clock. Every connect is replayed.
        let mut subject = if c.subject == enforcer_common::ProcGrants::default() {
            SubjectState::default()
        } else {
            view.subject_state(Some(c.subject), self.grants.act.revoked(&view), when)
        };
        self.fill_learned(&mut subject, &view, c.ip, c.boot_ns);
        let ours = if c.send {
            decide::judge_send(c.ip, c.port, &subject, self.mode, when, Some(c.boot_ns))
        } else {
            decide::judge_connect(c.ip, c.port, &subject, self.mode, when, Some(c.boot_ns))
        };
        let theirs = kernel_judgement(&c, &subject, &view);
        let agree = same_judgement(&ours, &theirs);
        if !agree {
            self.counts.decision_mismatches += 1;
            tracing::warn!(pid = c.tgid, kernel = ?theirs, userspace = ?ours, "connect judgement mismatch");
        }
        // Routine (allowed, nothing ended by it): counted, summarised once a second, and
        // nothing more is done for it (no attribution, no decision path).
        if decide::verdict_of(theirs.verdict) == Some(Verdict::Allowed)
            && c.revoked_now == 0
            && !self.routine.admit(c.tgid)
        {
            self.counts.connects_folded += 1;
            return;
        }
        // An egress record from softirq carries no cgroup: the process's own is used.
        let cgroup = Some(c.cgroup_id).filter(|id| *id != 0);
        let (process, known) = self.process_ref_with(c.tgid, Some(c.uid), cgroup);
        subject.known = known;
        let mut d = decide::explain(&theirs, c.ip, c.port, &subject, self.mode, when);
        let name = learned_name(&subject, theirs.slot, c.ip);
        if let Some(name) = &name {
            d.decision_path.push(format!("address learned from DNS name {name} (stub answer)"));
        }
        if !agree {
            // The kernel's judgement is what happened; say where the two disagreed.
            d.decision_path.push(format!(
                "kernel judged {} (slot {}, action {}); the daemon's replay: {} (slot {}, action {})",
                d.verdict.as_str(),
                c.grant_slot,
                decide::action_of(theirs.action).as_str(),
                decide::verdict_of(ours.verdict).map_or("unknown", |v| v.as_str()),
                slot_of(&subject, ours.slot),
                decide::action_of(ours.action).as_str(),
            ));
        } else if c.verdict != enforcer_common::verdict::NO_GRANT_HELD {
            d.decision_path.push("kernel verdict agrees".into());
        }
        let grant_slot = Some(c.grant_slot).filter(|s| *s != 0 && view.grant(*s).is_some());
        if c.revoked_now == 1 {
            d.decision_path
                .push("grant revoked in the kernel on this violation (revoke_on_violation)".into());
        }
        if d.action == Action::Killed {
            // Pin the image for the alert before the process dies.
            self.alert_facts_of(c.tgid, &process.exe);
        }
        let kill_failed =
            (d.action == Action::Killed).then(|| act::kill(c.tgid, &mut d.decision_path)).flatten();
        if kill_failed.is_some() {
            // Denied (the kernel or fanotify already refused the use), not killed.
            d.action = Action::Denied;
        }
        let dest =
            DestinationRef { ip: ip_string(c.ip), port: c.port, protocol: c.protocol.name(), name };
        let killer = kill_failed.map(|err| (process.clone(), err));
        if c.send {
            d.decision_path.push(if c.cgroup_id == 0 {
                "data on an established socket, sent from softirq: judged by the socket's owner and what was written to it".into()
            } else {
                "data written to an established socket (connected before the read, accepted, or received from another process)".into()
            });
        }
        let kind = if c.send { "send" } else { "connect" };
        let mut e = self.event(kind, &d, process);
        e.grant = grant_ref(&d, &subject.held);
        if let decide::Reason::Taint(secret) = &d.reason {
            e.mitre = vec!["T1041".into(), "T1567".into()];
            e.message = Some(if c.send {
                format!(
                    "possible exfiltration of secret {secret:?}: data sent on an established socket toward where it is not valid; the socket is blocked"
                )
            } else {
                format!(
                    "possible exfiltration of secret {secret:?}: connection outside where it is valid"
                )
            });
        }
        // When the kernel saw it, not when the daemon got to it.
        e.time = event::rfc3339(when);
        e.destination = Some(dest);
        self.emit(e);
        if let Some((process, err)) = killer {
            self.kill_failed(&d, process, err);
        }
        // Ending a misused grant: kernel-revoked already (revoke_on_violation) or killed.
        if let Some(slot) = grant_slot
            && (c.revoked_now == 1
                || (d.action == Action::Killed && d.reason == decide::Reason::Grant))
        {
            let why = if c.revoked_now == 1 {
                "revoke_on_violation"
            } else {
                "holder killed on violation"
            };
            // A kernel revoke happened at the violating connect itself.
            let at = if c.revoked_now == 1 { when } else { Utc::now() };
            self.grants.act.revoke(&view, slot, why, at);
        }
    }

    /// A socket() the kernel judged (denied in enforce mode, alerted in monitor mode).
    fn on_socket(&mut self, s: SocketUse) {
        self.counts.sockets += 1;
        let (process, _) = self.process_ref_with(s.tgid, Some(s.uid), Some(s.cgroup_id));
        let taint = socket::taint_names(&self.grants.view.load(), s.subject.taint);
        let (d, sref, message) = socket::explain(&s, self.mode, &taint);
        let mut e = self.event("socket", &d, process);
        e.time = event::rfc3339(wall_time_of(s.boot_ns));
        e.mitre = vec!["T1095".into(), "T1041".into()];
        e.socket = Some(sref);
        e.message = Some(message);
        self.emit(e);
    }

    /// A process holding secrets named a Unix socket: an alert in every mode.
    fn on_ipc(&mut self, i: IpcUse) {
        let (process, _) = self.process_ref_with(i.tgid, Some(i.uid), Some(i.cgroup_id));
        let secrets = socket::taint_names(&self.grants.view.load(), i.taint);
        let (d, iref, message) = ipc::explain(&i, self.mode, &secrets);
        if iref.peer.as_ref().is_some_and(|p| p.pid == std::process::id()) {
            // This daemon's own sockets (API, credential and workload endpoints): trusted.
            return;
        }
        let mut e = self.event("ipc", &d, process);
        e.time = event::rfc3339(wall_time_of(i.boot_ns));
        e.mitre = vec!["T1559".into()];
        e.ipc = Some(iref);
        e.secrets = secrets;
        e.message = Some(message);
        self.emit(e);
    }

    /// Decides a waiting secret open; returns whether to allow it. The kernel map's entry
    /// for the opener is read while it waits in open().
    pub fn on_file_open(&mut self, f: FileOpen) -> bool {
        let (mut process, known) = self.process_ref(f.pid, None);
        // The opener waits in open(): its cgroup *now* is what counts (it may have moved
        // since exec). Only a process provably outside cgroup_root is let through unjudged.
        if let Some(now) = crate::proc::current_cgroup(f.pid) {
            process.cgroup = now;
        }
        if known && !is_within(&process.cgroup, &self.cgroup_scope) {
            return true;
        }
        self.counts.file_opens += 1;
        let view = self.grants.view.load();
        let actor = &mut self.grants.act;
        let now = Utc::now();
        let mut subject = match (actor.state_of(f.pid), self.table.exited_grants(f.pid)) {
            (None, Some(slots)) => SubjectState {
                held: view.held(&slots, actor.revoked(&view), now),
                ..Default::default()
            },
            (pg, _) => view.subject_state(pg, actor.revoked(&view), now),
        };
        subject.known = known;
        let without_grant = view.without_grant(&f.secret);
        let mut d = decide::decide(
            &Use::SecretOpen { secret: f.secret.clone(), without_grant },
            &subject,
            self.mode,
            now,
        );
        let allow = !act::denies(d.action);
        if allow {
            // Taint before the open returns: the opener cannot connect before this lands.
            let start = self.table.get(f.pid).map(|p| p.start_ns).unwrap_or(0);
            let bits = view.secret_bits(&f.secret);
            if let Err(e) = self.grants.act.taint(f.pid, start, bits) {
                tracing::error!("taint pid {}: {e:#}", f.pid);
            }
        }
        if d.action == Action::Killed {
            // Pin the image for the alert before the process dies.
            self.alert_facts_of(f.pid, &process.exe);
        }
        let kill_failed =
            (d.action == Action::Killed).then(|| act::kill(f.pid, &mut d.decision_path)).flatten();
        if kill_failed.is_some() {
            // Denied (the kernel or fanotify already refused the use), not killed.
            d.action = Action::Denied;
        }
        let kind = self.secret_kinds.get(&f.secret).copied().unwrap_or(SecretKind::CredentialsFile);
        let killer = kill_failed.map(|err| (process.clone(), err));
        let mut e = self.event("file_open", &d, process);
        e.grant = grant_ref(&d, &subject.held);
        e.mitre = vec![match kind {
            SecretKind::PrivateKey => "T1552.004".into(),
            _ => "T1552.001".into(),
        }];
        e.file = Some(FileRef { path: f.path, dev: f.dev, ino: f.ino, secret: f.secret });
        self.emit(e);
        if let Some((process, err)) = killer {
            self.kill_failed(&d, process, err);
        }
        // Ending a misused grant: revoke_on_violation, or its holder killed.
        let held = d.grant.and_then(|i| subject.held.get(i)).filter(|g| g.slot != 0);
        if let Some(g) = held.filter(|_| d.verdict != Verdict::Allowed) {
            let killed = d.action == Action::Killed;
            if killed || g.revoke_on_violation {
                let why = if killed { "holder killed on violation" } else { "revoke_on_violation" };
                self.grants.act.revoke(&view, g.slot, why, Utc::now());
            }
        }
        allow
    }

    /// A secret open the daemon read but did not get to judge within `deadline`: answered
    /// with the safe default (deny in enforce mode, allow in monitor mode) without reading
    /// grants, and recorded as an alert so the miss is visible.
    pub fn on_file_open_late(&mut self, f: FileOpen, deadline: std::time::Duration) -> bool {
        self.counts.file_opens += 1;
        self.counts.file_opens_late += 1;
        let (process, _) = self.process_ref(f.pid, None);
        let allow = self.mode != Mode::Enforce;
        let d = Decision {
            verdict: Verdict::NoGrant,
            action: if allow { Action::Alerted } else { Action::Denied },
            decision_path: vec![
                format!(
                    "not judged within the {} ms decision deadline (daemon overloaded)",
                    deadline.as_millis()
                ),
                format!(
                    "mode {}: safe default {}",
                    self.mode,
                    if allow { "allow (monitor)" } else { "deny" }
                ),
            ],
            grant: None,
            expired_for_ms: None,
            reason: decide::Reason::Grant,
        };
        let mut e = self.event("file_open", &d, process);
        e.mitre = vec!["T1552.001".into()];
        e.file = Some(FileRef { path: f.path, dev: f.dev, ino: f.ino, secret: f.secret });
        self.emit(e);
        allow
    }

    /// A static credential in a process's environment (legacy broad keys that CI jobs still
    /// carry): one event per job (or cgroup), variable and value fingerprint.
    fn report_env_credentials(&mut self, pid: u32) {
        // Per exec: look before cloning anything; most processes carry no static key.
        let Some(p) = self.table.get(pid).filter(|p| !p.env_credentials.is_empty()).cloned() else {
            return;
        };
        let cgroup = self.table.cgroup_path(p.cgroup_id);
        if !is_within(&cgroup, &self.cgroup_scope) {
            return;
        }
        let scope = p.job.as_ref().map(|j| format!("job:{}", j.id)).unwrap_or(cgroup);
        for c in &p.env_credentials {
            if self.env_seen.len() >= MAX_ENV_SEEN {
                self.env_seen.clear();
            }
            let seen = std::hash::BuildHasher::hash_one(
                &self.env_seen_key,
                (scope.as_str(), c.name.as_str(), c.fingerprint.as_str()),
            );
            if !self.env_seen.insert(seen) {
                continue;
            }
            let (process, known) = self.process_ref(pid, None);
            let path = vec![
                if known { "subject resolved" } else { "subject unresolved" }.to_string(),
                format!("environment at exec holds {} (fingerprint {})", c.name, c.fingerprint),
                "a static credential carried in the environment is covered by no grant".to_string(),
                format!("mode {}: alert", self.mode),
            ];
            let d = Decision {
                verdict: Verdict::NoGrant,
                action: Action::Alerted,
                decision_path: path,
                grant: None,
                expired_for_ms: None,
                reason: decide::Reason::Grant,
            };
            let mut e = self.event("env_credential", &d, process);
            e.severity = "medium".into();
            e.mitre = vec!["T1078".into()];
            e.message =
                Some(format!("static credential {} in the environment of {}", c.name, p.exe));
            self.emit(e);
        }
    }

    /// An event about the agent itself (started, stopped, lost events).
    /// on_violation = "kill" could not be carried out: the use was denied, the process runs
    /// on. An alert of its own, so a SOC sees it apart from the violation.
    fn kill_failed(&mut self, d: &Decision, process: ProcessRef, err: std::io::Error) {
        let pid = process.pid;
        let mut d = d.clone();
        d.action = Action::Denied;
        let mut e = self.event("kill_failed", &d, process);
        e.severity = "critical".into();
        e.message = Some(format!(
            "on_violation kill failed for process {pid} ({err}): the use was denied, the \
             process still runs"
        ));
        self.emit(e);
    }

    pub fn agent_event(&mut self, kind: &str, severity: &str, message: String) {
        let (process, _) = self.process_ref(std::process::id(), None);
        let d = Decision::informational();
        let mut e = self.event(kind, &d, process);
        e.severity = severity.into();
        e.message = Some(message);
        self.emit(e);
    }

    /// A JWT-SVID issued or refused on the Workload API (never the token: its jti and kid are
    /// in the message). The process is the caller.
    pub fn on_svid(&mut self, s: crate::spiffe::SvidEvent) {
        let (process, _) = self.process_ref(s.pid, None);
        let d = Decision {
            verdict: s.verdict,
            action: if s.issued { decide::Action::Allowed } else { decide::Action::Denied },
            decision_path: s.decision_path,
            grant: None,
            expired_for_ms: None,
            reason: decide::Reason::None,
        };
        let kind = if s.issued { "svid_issued" } else { "svid_refused" };
        let mut e = self.event(kind, &d, process);
        e.grant = s.grant.map(|(id, intent, exp)| GrantRef {
            id,
            intent,
            expires_at: event::rfc3339(exp),
            expired_for_ms: None,
        });
        if !s.issued {
            e.severity = "medium".into();
        }
        e.message = Some(s.message);
        self.emit(e);
    }

    /// A grant's life: issued, expired, revoked, ended. The process is the grant's subject.
    pub fn on_grant_change(&mut self, change: GrantChange) {
        let (kind, g, message) = match change {
            GrantChange::Issued(g) => {
                let m = format!(
                    "grant {} issued for intent {} to pid {} until {}{}",
                    g.id,
                    g.intent,
                    g.subject.pid,
                    g.expires_at.to_rfc3339(),
                    g.ttl_clamped_from.as_ref().map(|c| format!(" ({c})")).unwrap_or_default()
                );
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
                let m = format!(
                    "grant {} (intent {}) ended: every process holding it exited",
                    g.id, g.intent
                );
                ("grant_ended", g, m)
            }
        };
        let (mut process, _) = self.process_ref(g.subject.pid, None);
        if process.exe.is_empty() {
            process.exe = g.subject.exe.clone();
            process.uid = g.subject.uid;
        }
        let d = Decision::informational();
        let mut e = self.event(kind, &d, process);
        e.grant = Some(grant_ref_of(&g, None));
        e.secrets = g.secrets.clone();
        e.message = Some(message);
        self.emit(e);
    }

    /// The event's view of `pid`, and whether it is resolved. Never reads /proc: a process
    /// the table has not seen gets what the record says (`uid`, `cgroup_id`) and
    /// `facts_unknown`, and its facts are read off the main loop.
    fn process_ref(&mut self, pid: u32, cgroup_id: Option<u64>) -> (ProcessRef, bool) {
        self.process_ref_with(pid, None, cgroup_id)
    }

    fn process_ref_with(
        &mut self,
        pid: u32,
        uid: Option<u32>,
        cgroup_id: Option<u64>,
    ) -> (ProcessRef, bool) {
        let p = self.table.get_or_request(pid, uid, cgroup_id);
        let known = !matches!(p.facts, crate::proc::Facts::Unknown(_));
        let mut r = ProcessRef {
            pid,
            ppid: p.ppid,
            uid: p.uid,
            exe: p.exe.clone(),
            cmdline: event::join_cmdline(&p.cmdline),
            job: p.job.clone(),
            env_credentials: p.env_credentials.clone(),
            facts_unknown: p.facts_unknown(),
            ..Default::default()
        };
        let id = cgroup_id.unwrap_or(p.cgroup_id);
        r.cgroup = self.table.cgroup_path(id);
        (r.unit, r.container_id) = event::cgroup_facts(&r.cgroup);
        (r, known)
    }

    pub(super) fn event(&mut self, kind: &str, d: &Decision, process: ProcessRef) -> Event {
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
            socket: None,
            ipc: None,
            decision_path: d.decision_path.clone(),
            secrets: vec![],
            credentials: vec![],
            mitre: vec![],
            severity: if alert { "high" } else { "info" }.into(),
            message: None,
        }
    }

    pub(super) fn emit(&mut self, mut e: Event) {
        if let Some(g) = &e.grant
            && (e.kind == "connect" || e.kind == "file_open")
        {
            let what = match (&e.file, &e.destination) {
                (Some(f), _) => format!(
                    "{} of secret {} by pid {}: {}",
                    e.kind, f.secret, e.process.pid, e.verdict
                ),
                (_, Some(d)) => format!(
                    "{} to {}:{} by pid {}: {}",
                    e.kind, d.ip, d.port, e.process.pid, e.verdict
                ),
                _ => e.kind.clone(),
            };
            self.grants.ledger.note_use(&g.id, &what);
        }
        if e.verdict != "allowed" && e.process.pid != 0 {
            // Ask for the environment now (off the main loop), so it is read while the exe
            // is hashed; `store_event` attaches it.
            let _ = self.table.env_for_alert(e.process.pid);
            // Alerts carry the full picture: ancestry and what exactly ran.
            let (chain, hash) = self.alert_facts_of(e.process.pid, &e.process.exe);
            e.process.parent_chain = chain;
            if let ExeHash::Pending(id) = hash {
                // Written when the worker has hashed the executable, or without the hash
                // after exe_hash::WAIT; the decision was made and answered already.
                if let Some(mut e) = self.exe_hashes.defer(e, id) {
                    let why = ExeHash::Unknown("too many alerts waiting for a hash".into());
                    self.exe_hashes.fill(&mut e, &why);
                    self.store_event(e);
                }
                return;
            }
            self.exe_hashes.fill(&mut e, &hash);
        }
        // Cloud instance metadata: where instance credentials are fetched from.
        if let Some(d) = &e.destination
            && (d.ip == "169.254.169.254" || d.ip == "fd00:ec2::254")
        {
            e.mitre.push("T1552.005".into());
        }
        self.store_event(e);
    }

    /// Sizes of the engine's tables and queues (`status` `memory`): every one is bounded.
    pub fn memory(&self) -> serde_json::Value {
        let (capacity, exe_paths) = self.table.capacities();
        serde_json::json!({
            "processes_tracked": self.table.len(),
            "process_table_capacity": capacity,
            "exe_paths_cached": exe_paths,
            "alert_facts": self.alert_facts.len(),
            "env_credentials_seen": self.env_seen.len(),
            "alerts_waiting_hash": self.exe_hashes.waiting(),
            "alerts_waiting_env": self.env_stage.waiting(),
        })
    }

    /// (ancestry, exe hash) of a process for its alerts; cached per (pid, exe), so a flood
    /// of alerts from one process costs one lookup and one hash.
    fn alert_facts_of(&mut self, pid: u32, exe: &str) -> (Vec<event::Ancestor>, ExeHash) {
        if let Some(v) = self.alert_facts.get_mut(&pid).filter(|v| v.0 == exe) {
            v.2 = self.exe_hashes.resolve(&v.2);
            return (v.1.clone(), v.2.clone());
        }
        let chain: Vec<event::Ancestor> = self
            .table
            .parent_chain(pid, 8)
            .into_iter()
            .map(|(pid, exe)| event::Ancestor { pid, exe })
            .collect();
        let hash = self.exe_hashes.start(pid);
        // Kept only for a running process: its exit record drops the entry, and one written
        // after that (an environment read applied after the exit) would stay until `purge`.
        if self.table.get(pid).is_some_and(|p| p.exited_at.is_none()) {
            if self.alert_facts.len() >= MAX_ALERT_FACTS {
                self.alert_facts.clear();
            }
            self.alert_facts.insert(pid, (exe.to_string(), chain.clone(), hash.clone()));
        }
        (chain, hash)
    }

    /// Once a second: drops exited processes past their grace period and alert facts of
    /// processes the table no longer holds.
    pub fn purge(&mut self) {
        self.table.purge();
        let table = &self.table;
        self.alert_facts.retain(|pid, _| table.get(*pid).is_some_and(|p| p.exited_at.is_none()));
    }

    /// The environment reads' turn (after each batch of records; never waits): applies
    /// finished reads, reports the static keys they found, hands out reads for the batch's
    /// execs, and writes alerts whose environment is in.
    pub fn env_pass(&mut self) {
        for pid in self.table.env_pass(&self.cgroup_scope) {
            self.report_env_credentials(pid);
        }
        for e in self.env_stage.ready(&self.table, false) {
            self.write_event(e);
        }
    }

    /// Writes alerts whose executable hash and environment are in (or overdue); all of them
    /// when `all`.
    pub fn release_alerts(&mut self, all: bool) {
        for e in self.exe_hashes.ready(all) {
            self.store_event(e);
        }
        self.env_pass();
        if all {
            for e in self.env_stage.ready(&self.table, true) {
                self.write_event(e);
            }
        }
    }

    /// Alerts waiting for a hash or an environment read.
    pub fn alerts_waiting(&self) -> usize {
        self.exe_hashes.waiting() + self.env_stage.waiting()
    }

    /// To the outbox, through the environment stage for alerts.
    fn store_event(&mut self, e: Event) {
        if let Some(e) = self.env_stage.admit(&mut self.table, e) {
            self.write_event(e);
        }
    }

    fn write_event(&mut self, e: Event) {
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

fn grant_ref(d: &Decision, held: &[HeldGrant]) -> Option<GrantRef> {
    let g = held.get(d.grant?)?;
    Some(GrantRef {
        id: g.id.clone(),
        intent: g.intent.clone(),
        expires_at: event::rfc3339(g.expires_at),
        expired_for_ms: d.expired_for_ms,
    })
}

fn grant_ref_of(g: &Grant, expired_for_ms: Option<u64>) -> GrantRef {
    GrantRef {
        id: g.id.clone(),
        intent: g.intent.clone(),
        expires_at: event::rfc3339(g.expires_at),
        expired_for_ms,
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
