//! The ledger's single writer: a thread that applies grant records in the order the registry
//! made them, so no SQLite write (or its wait on the WAL) happens under the registry lock or
//! on the decision path. A lifecycle change goes to the event stream once its ledger record
//! is written, so events and ledger agree on order. Records go to SQLite in groups, one
//! transaction each (group commit): what arrives within GROUP_WINDOW of a group's first
//! record, or queued up while the previous group was written.
//!
//! A new grant is durable before it is answered without waiting for SQLite: `insert`
//! appends it to the journal (`super::journal`, one write) and the issuer goes on; the
//! journal is replayed into SQLite at the next start if the daemon dies first.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use super::journal::Journal;
use super::ledger::{Batch, Ledger};
use super::model::{Grant, GrantState};
use super::registry::GrantChange;
use super::timing::Stamps;

enum Op {
    /// A new grant, already in the journal under this sequence number.
    Insert(Grant, u64),
    SetState {
        id: String,
        state: GrantState,
        reason: String,
        at: DateTime<Utc>,
        then: Option<GrantChange>,
    },
    /// A change with no record of its own (already written, or written elsewhere).
    Announce(GrantChange),
    Use {
        id: String,
        detail: String,
    },
    /// Answered once everything sent before it is written.
    Barrier(oneshot::Sender<()>),
}

/// Sends records to the writer; cheap to clone; only `insert` writes (one small append).
#[derive(Clone)]
pub struct LedgerTx(mpsc::Sender<Op>, Arc<Journal>, Arc<Urgent>);

/// Wakes a writer collecting a group for a record somebody waits for (a barrier).
struct Urgent {
    flag: AtomicBool,
    writer: std::thread::Thread,
}

impl LedgerTx {
    /// Starts the writer thread over the shared ledger (readers lock it briefly too).
    pub fn spawn(ledger: Arc<Mutex<Ledger>>, changes: UnboundedSender<GrantChange>) -> Self {
        let journal = ledger.lock().unwrap_or_else(|e| e.into_inner()).journal();
        let (tx, rx) = mpsc::channel();
        let j = journal.clone();
        let (urgent_tx, urgent_rx) = mpsc::channel::<Arc<Urgent>>();
        let handle = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                super::sched::set_thread_nice(super::sched::BACKGROUND_NICE);
                let Ok(urgent) = urgent_rx.recv() else { return };
                run(ledger, j, rx, &urgent, changes)
            })
            .expect("spawn the ledger writer");
        let urgent =
            Arc::new(Urgent { flag: AtomicBool::new(false), writer: handle.thread().clone() });
        let _ = urgent_tx.send(urgent.clone());
        LedgerTx(tx, journal, urgent)
    }

    /// Records a new grant: once this returns Ok it survives a crash of the daemon (it is in
    /// the journal); the writer copies it into SQLite with the next group.
    pub fn insert(&self, grant: Grant) -> Result<(), String> {
        self.insert_stamped(grant, &mut Stamps::off())
    }

    /// `insert`, marking the journal's stages in `stamps`.
    pub fn insert_stamped(&self, grant: Grant, stamps: &mut Stamps) -> Result<(), String> {
        self.1
            .append_stamped(grant, stamps, |g, seq| {
                // A stopped writer means the daemon is stopping: the journal has the record
                // and the next start puts it into SQLite.
                let _ = self.0.send(Op::Insert(g, seq));
            })
            .map_err(|e| format!("ledger journal: {e}"))
    }

    /// Records that an active grant ended, then announces `then`.
    pub fn set_state(
        &self,
        id: &str,
        state: GrantState,
        reason: &str,
        at: DateTime<Utc>,
        then: Option<GrantChange>,
    ) {
        let _ = self.0.send(Op::SetState {
            id: id.to_string(),
            state,
            reason: reason.to_string(),
            at,
            then,
        });
    }

    /// Announces a change after everything queued before it is written.
    pub fn announce(&self, change: GrantChange) {
        let _ = self.0.send(Op::Announce(change));
    }

    /// Records a use of a grant (throttled by the writer to one entry a second per grant,
    /// so a connect flood cannot turn into a write flood).
    pub fn note_use(&self, id: &str, detail: &str) {
        let _ = self.0.send(Op::Use { id: id.to_string(), detail: detail.to_string() });
    }

    /// Resolves once every record sent before it is in the ledger (read-your-writes for
    /// the Mint API).
    pub async fn barrier(&self) {
        let (tx, rx) = oneshot::channel();
        if self.0.send(Op::Barrier(tx)).is_ok() {
            // A writer collecting a group closes it now instead of at the window's end.
            self.2.flag.store(true, Ordering::Release);
            self.2.writer.unpark();
            let _ = rx.await;
        }
    }
}

/// Records applied in one transaction at most.
const MAX_GROUP: usize = 512;
/// How long a group collects records after its first one. Nobody waits on a group but
/// readers asking for a barrier (which close it at once) and the event stream; one WAL
/// commit per grant was most of an issue's CPU.
const GROUP_WINDOW: Duration = Duration::from_millis(10);

/// Collects groups and writes them. The writer sleeps through a group's window instead of
/// waiting on the channel: a sender then finds no receiver to wake, so a group of n records
/// costs the writer one wake-up, not n (each was a futex wake and a context switch on the
/// issuing thread's CPU). A barrier sets `urgent` and unparks it.
fn run(
    ledger: Arc<Mutex<Ledger>>,
    journal: Arc<Journal>,
    rx: mpsc::Receiver<Op>,
    urgent: &Urgent,
    changes: UnboundedSender<GrantChange>,
) {
    let mut last_use: HashMap<String, Instant> = HashMap::new();
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Ok(op) = rx.recv() {
        let close = Instant::now() + GROUP_WINDOW;
        let mut waited_for = matches!(op, Op::Barrier(_));
        group.push(op);
        loop {
            while group.len() < MAX_GROUP && !waited_for {
                match rx.try_recv() {
                    Ok(op) => {
                        waited_for = matches!(op, Op::Barrier(_));
                        group.push(op);
                    }
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if group.len() >= MAX_GROUP || waited_for || now >= close {
                break;
            }
            if urgent.flag.swap(false, Ordering::AcqRel) {
                // A barrier is on its way (sent before the flag was set): take it next.
                continue;
            }
            std::thread::park_timeout(close - now);
        }
        urgent.flag.store(false, Ordering::Release);
        apply(&ledger, &journal, &mut group, &mut last_use, &changes);
    }
}

/// What to do once a group is committed, in the order the records came.
enum After {
    Issued(Grant),
    Announce(GrantChange),
    Barrier(oneshot::Sender<()>),
}

/// Writes `group` in one transaction, then announces in order. First without a savepoint
/// per record (the common case: every record goes in); if any record fails, that attempt is
/// rolled back whole and the group is written again with one savepoint per record, so a
/// failing record is rolled back alone. If the commit itself fails, no record of the group
/// is written. Either way the journal keeps the grants of the group (the next start replays
/// them) and their issue is not announced.
fn apply(
    ledger: &Mutex<Ledger>,
    journal: &Journal,
    group: &mut Vec<Op>,
    last_use: &mut HashMap<String, Instant>,
    changes: &UnboundedSender<GrantChange>,
) {
    // Uses are throttled to one a second per grant: decided once, before any attempt.
    let now = Instant::now();
    group.retain(|op| {
        let Op::Use { id, .. } = op else { return true };
        if last_use.get(id).is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1)) {
            return false;
        }
        if last_use.len() > 20_000 {
            last_use.clear();
        }
        last_use.insert(id.clone(), now);
        true
    });
    let (committed, ok) = {
        let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
        match write_unguarded(&mut l, group) {
            Ok(()) => (true, vec![true; group.len()]),
            Err(e) => {
                tracing::debug!(
                    "ledger: group of {} rewritten record by record: {e:#}",
                    group.len()
                );
                write_guarded(&mut l, group)
            }
        }
    };
    // The last journal record committed here, and whether every one in the group was.
    let (mut inserted, mut all_inserted) = (0u64, true);
    let mut after = Vec::with_capacity(group.len());
    for (op, ok) in group.drain(..).zip(ok) {
        match op {
            Op::Insert(grant, seq) => {
                if ok {
                    inserted = inserted.max(seq);
                    after.push(After::Issued(grant));
                } else {
                    all_inserted = false;
                }
            }
            Op::SetState { then: Some(c), .. } => after.push(After::Announce(c)),
            Op::Announce(c) => after.push(After::Announce(c)),
            Op::Barrier(done) => after.push(After::Barrier(done)),
            Op::SetState { then: None, .. } | Op::Use { .. } => {}
        }
    }
    if !committed || !all_inserted {
        // Some grant of the group is only in the journal: keep it until the next start.
        journal.hold();
    } else if inserted > 0 {
        journal.applied(inserted);
    }
    for a in after {
        match a {
            After::Issued(g) => {
                if committed {
                    let _ = changes.send(GrantChange::Issued(g));
                }
            }
            After::Announce(c) => {
                let _ = changes.send(c);
            }
            After::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// One record on `b`.
fn write_one(b: &mut Batch<'_>, op: &Op) -> anyhow::Result<()> {
    match op {
        Op::Insert(grant, _) => b.insert(grant),
        Op::SetState { id, state, reason, at, .. } => {
            b.set_state(id, *state, reason, *at).map(drop)
        }
        Op::Use { id, detail } => b.record_use(id, detail),
        Op::Announce(_) | Op::Barrier(_) => Ok(()),
    }
}

/// The whole group in one transaction with no savepoints; any error rolls all of it back.
fn write_unguarded(l: &mut Ledger, group: &[Op]) -> anyhow::Result<()> {
    let mut b = l.batch_unguarded()?;
    for op in group {
        write_one(&mut b, op)?;
    }
    b.commit()
}

/// The group record by record, each in its own savepoint: (committed, written per record).
fn write_guarded(l: &mut Ledger, group: &[Op]) -> (bool, Vec<bool>) {
    let mut b = match l.batch() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("ledger: cannot begin a transaction: {e:#}");
            return (false, vec![false; group.len()]);
        }
    };
    let mut ok = Vec::with_capacity(group.len());
    for op in group {
        let r = write_one(&mut b, op);
        if let Err(e) = &r {
            match op {
                Op::Insert(g, _) => tracing::error!("ledger: grant {}: {e:#}", g.id),
                Op::SetState { id, state, .. } => {
                    tracing::error!("ledger: {} {id}: {e:#}", state.as_str())
                }
                Op::Use { id, .. } => tracing::warn!("ledger: record use of {id}: {e:#}"),
                Op::Announce(_) | Op::Barrier(_) => {}
            }
        }
        ok.push(r.is_ok());
    }
    match b.commit() {
        Ok(()) => (true, ok),
        Err(e) => {
            tracing::error!("ledger: commit: {e:#}");
            (false, vec![false; group.len()])
        }
    }
}
