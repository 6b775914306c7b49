//! The ledger's single writer: a thread that applies grant records in the order the registry
//! made them, so no SQLite write (or its wait on the WAL) happens under the registry lock or
//! on the decision path. A lifecycle change goes to the event stream once its ledger record
//! is written, so events and ledger agree on order. Records that queue up while one group is
//! being written go in the next group, in one transaction (group commit): under a burst of
//! issues one WAL commit serves many grants, and each issuer still hears back only after its
//! record is committed.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use super::ledger::Ledger;
use super::model::{Grant, GrantState};
use super::registry::GrantChange;

enum Op {
    /// A new grant; the issuer waits for the outcome (no 201 for a grant not on record).
    Insert(Grant, oneshot::Sender<Result<(), String>>),
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

/// Sends records to the writer; cheap to clone, never blocks.
#[derive(Clone)]
pub struct LedgerTx(mpsc::Sender<Op>);

impl LedgerTx {
    /// Starts the writer thread over the shared ledger (readers lock it briefly too).
    pub fn spawn(ledger: Arc<Mutex<Ledger>>, changes: UnboundedSender<GrantChange>) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || run(ledger, rx, changes))
            .expect("spawn the ledger writer");
        LedgerTx(tx)
    }

    /// Records a new grant; the receiver gets the outcome once written.
    pub fn insert(&self, grant: Grant) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Op::Insert(_, reply))) = self.0.send(Op::Insert(grant, tx)) {
            let _ = reply.send(Err("the ledger writer has stopped".into()));
        }
        rx
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
            let _ = rx.await;
        }
    }
}

/// Records applied in one transaction at most (a group commit: what queued up while the
/// previous group was written goes in the next one).
const MAX_GROUP: usize = 256;

fn run(ledger: Arc<Mutex<Ledger>>, rx: mpsc::Receiver<Op>, changes: UnboundedSender<GrantChange>) {
    let mut last_use: HashMap<String, Instant> = HashMap::new();
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Ok(op) = rx.recv() {
        group.push(op);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        apply(&ledger, &mut group, &mut last_use, &changes);
    }
}

/// What to do once a group is committed, in the order the records came.
enum After {
    Reply(oneshot::Sender<Result<(), String>>, Result<(), String>, Option<Grant>),
    Announce(GrantChange),
    Barrier(oneshot::Sender<()>),
}

/// Writes `group` in one transaction, then answers and announces in order. A record that
/// fails is rolled back alone; if the commit itself fails, no record of the group is written
/// and every issuer in it gets the error (its grant is undone).
fn apply(
    ledger: &Mutex<Ledger>,
    group: &mut Vec<Op>,
    last_use: &mut HashMap<String, Instant>,
    changes: &UnboundedSender<GrantChange>,
) {
    let mut after = Vec::with_capacity(group.len());
    let committed = {
        let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch = match l.batch() {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::error!("ledger: cannot begin a transaction: {e:#}");
                None
            }
        };
        for op in group.drain(..) {
            match op {
                Op::Insert(grant, reply) => {
                    let r = match batch.as_mut() {
                        Some(b) => b.insert(&grant).map_err(|e| format!("ledger: {e:#}")),
                        None => Err("ledger: no transaction".into()),
                    };
                    after.push(After::Reply(reply, r, Some(grant)));
                }
                Op::SetState { id, state, reason, at, then } => {
                    if let Some(b) = batch.as_mut()
                        && let Err(e) = b.set_state(&id, state, &reason, at)
                    {
                        tracing::error!("ledger: {} {id}: {e:#}", state.as_str());
                    }
                    if let Some(c) = then {
                        after.push(After::Announce(c));
                    }
                }
                Op::Announce(c) => after.push(After::Announce(c)),
                Op::Use { id, detail } => {
                    let now = Instant::now();
                    if last_use
                        .get(&id)
                        .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1))
                    {
                        continue;
                    }
                    if last_use.len() > 20_000 {
                        last_use.clear();
                    }
                    if let Some(b) = batch.as_mut()
                        && let Err(e) = b.record_use(&id, &detail)
                    {
                        tracing::warn!("ledger: record use of {id}: {e:#}");
                    }
                    last_use.insert(id, now);
                }
                Op::Barrier(done) => after.push(After::Barrier(done)),
            }
        }
        match batch.map(|b| b.commit()) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => {
                tracing::error!("ledger: commit: {e:#}");
                Err(format!("ledger: commit: {e:#}"))
            }
            None => Err("ledger: no transaction".into()),
        }
    };
    for a in after {
        match a {
            After::Reply(reply, r, grant) => {
                let r = r.and(committed.clone());
                if r.is_ok()
                    && let Some(g) = grant
                {
                    let _ = changes.send(GrantChange::Issued(g));
                }
                let _ = reply.send(r);
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
