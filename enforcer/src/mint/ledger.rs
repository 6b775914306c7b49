//! The grant ledger: the durable record of every grant and what happened to it. The kernel maps
//! are the live truth (docs/architecture.md); this is what they are rebuilt from after a restart
//! that lost the pins, and what `grant list` and audits read.
//!
//! Every value reaches SQL as a bound parameter: ids, intents and reasons come from callers we
//! do not trust.
// Nothing outside this module calls these items yet (the Mint API wires them in).
#![allow(dead_code)]

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::journal::Journal;
use super::model::{Grant, GrantState};

pub const LEDGER_FILE: &str = "ledger.sqlite3";
const SCHEMA_VERSION: i64 = 1;

/// Migrations, index i takes user_version i to i+1. Append only; never edit a shipped one.
const MIGRATIONS: &[&str] = &["
    CREATE TABLE grants (
        id                 TEXT PRIMARY KEY NOT NULL,
        intent             TEXT NOT NULL,
        subject            TEXT NOT NULL,   -- JSON
        secrets            TEXT NOT NULL,   -- JSON array
        destinations       TEXT NOT NULL,   -- JSON array
        issued_at          TEXT NOT NULL,   -- RFC 3339, 9 fraction digits, Z: sorts as text
        expires_at         TEXT NOT NULL,
        expires_at_unix_ns INTEGER NOT NULL,
        state              TEXT NOT NULL CHECK (state IN ('active','expired','revoked','ended')),
        token              TEXT NOT NULL,
        ttl_clamped_from   TEXT,
        ended_at           TEXT,
        end_reason         TEXT
    ) STRICT;
    -- expire_due scans only live grants, however long the history grows.
    CREATE INDEX grants_active_by_expiry ON grants(expires_at_unix_ns) WHERE state = 'active';
    CREATE INDEX grants_by_issued ON grants(issued_at);
    CREATE TABLE grant_events (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        grant_id TEXT NOT NULL REFERENCES grants(id),
        time     TEXT NOT NULL,
        kind     TEXT NOT NULL
                 CHECK (kind IN ('issued','used','expired','revoked','subtree_ended')),
        detail   TEXT NOT NULL
    ) STRICT;
    CREATE INDEX grant_events_by_grant ON grant_events(grant_id, seq);
"];

const GRANT_COLS: &str = "id, intent, subject, secrets, destinations, issued_at, expires_at, \
                          state, token, ttl_clamped_from";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEvent {
    pub seq: i64,
    pub grant_id: String,
    pub time: DateTime<Utc>,
    /// 'issued', 'used', 'expired', 'revoked' or 'subtree_ended'.
    pub kind: String,
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<GrantState>,
    pub intent: Option<String>,
    /// At most this many grants; 0 means no limit.
    pub limit: usize,
}

pub struct Ledger {
    conn: Connection,
    /// Issued grants not yet (known to be) in SQLite; see `super::journal`.
    journal: std::sync::Arc<Journal>,
}

impl Ledger {
    /// Opens (creating if needed) `<state_dir>/ledger.sqlite3`.
    pub fn open(state_dir: &Path) -> anyhow::Result<Ledger> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("creating state dir {}", state_dir.display()))?;
        let path = state_dir.join(LEDGER_FILE);
        // Create the file ourselves with 0600: SQLite would create it 0644 (umask permitting).
        // SQLite gives its -wal and -shm files the main file's mode, so they stay private too.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mode = file.metadata()?.mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "refusing ledger {}: mode {mode:04o} lets others read grant tokens; chmod 0600 it",
                path.display()
            );
        }
        drop(file);

        let conn = Connection::open(&path)
            .with_context(|| format!("opening ledger {}", path.display()))?;
        // The mint API and the expiry sweep may briefly contend; wait rather than fail.
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!("ledger {}: could not enable WAL (journal_mode {mode})", path.display());
        }
        // WAL + synchronous=NORMAL: a commit is in the WAL file once the call returns, so it
        // survives a crash or kill of the daemon; only an OS crash or power loss can drop the
        // last commits (they are fsynced at checkpoints). That is the failure we must survive;
        // the kernel maps die with the OS anyway. It keeps an insert far below 1 ms.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        // Checkpoints fsync (milliseconds each on a VM disk); run inside an insert they put
        // that wait on the request holding the registry lock. So no automatic checkpoints
        // here: a background thread with its own connection checkpoints once a second.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        spawn_checkpointer(&path);
        let journal = std::sync::Arc::new(Journal::open(state_dir)?);
        let mut ledger = Ledger { conn, journal };
        ledger.migrate().with_context(|| format!("migrating ledger {}", path.display()))?;
        ledger.replay_journal()?;
        Ok(ledger)
    }

    /// Grants the daemon answered 201 for but died before committing here (see
    /// `super::journal`): inserted unless already present (a present one may have changed
    /// since), then the journal is emptied. Before anything reads the ledger.
    fn replay_journal(&mut self) -> anyhow::Result<usize> {
        let pending = self.journal.pending()?;
        let tx = self.conn.transaction()?;
        let mut added = 0;
        for g in &pending {
            if insert_if_absent_on(&tx, g)? {
                added += 1;
            }
        }
        tx.commit()?;
        self.journal.clear().context("emptying the ledger journal")?;
        if added > 0 {
            tracing::warn!(
                "ledger: {added} issued grant(s) recovered from the journal (the daemon stopped before committing them)"
            );
        }
        Ok(added)
    }

    /// The journal new grants are appended to before they are answered (the writer's).
    pub fn journal(&self) -> std::sync::Arc<Journal> {
        self.journal.clone()
    }

    fn migrate(&mut self) -> anyhow::Result<()> {
        let version: i64 = self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            bail!("schema version {version} is newer than this enforcer's ({SCHEMA_VERSION})");
        }
        for (v, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", v as i64 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Records a new grant and its 'issued' event atomically. A duplicate id is an error.
    pub fn insert(&mut self, g: &Grant) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        insert_on(&tx, g)?;
        tx.commit()?;
        Ok(())
    }

    /// A group of records in one transaction (one WAL commit for all of them): the writer
    /// applies what queued up meanwhile this way. Each record runs in its own savepoint, so
    /// one that fails leaves the others; nothing is written until `Batch::commit`.
    pub fn batch(&mut self) -> anyhow::Result<Batch<'_>> {
        Ok(Batch { tx: self.conn.transaction()?, guarded: true })
    }

    /// `batch` without a savepoint per record (two statements fewer to parse and run per
    /// record, and no statement sub-journal): a record that fails may leave part of itself
    /// written, so the caller must drop the batch (rolling all of it back) after any error
    /// and write the group again with `batch`. The writer's fast path.
    pub fn batch_unguarded(&mut self) -> anyhow::Result<Batch<'_>> {
        Ok(Batch { tx: self.conn.transaction()?, guarded: false })
    }

    /// Moves an active grant to `state` (expired, revoked, ended), with its event, atomically.
    /// Returns false, changing nothing, if the grant is unknown or no longer active: the first
    /// ending wins (a revoke racing the expiry sweep is recorded once).
    pub fn set_state(
        &mut self,
        id: &str,
        state: GrantState,
        reason: &str,
        at: DateTime<Utc>,
    ) -> anyhow::Result<bool> {
        let tx = self.conn.transaction()?;
        let changed = set_state_on(&tx, id, state, reason, at)?;
        tx.commit()?;
        Ok(changed)
    }

    /// Records one use of a grant (one statement, one implicit transaction).
    pub fn record_use(&mut self, id: &str, detail: &str) -> anyhow::Result<()> {
        add_event(&self.conn, id, Utc::now(), "used", detail)
    }

    pub fn get(&self, id: &str) -> anyhow::Result<Option<Grant>> {
        let mut stmt =
            self.conn.prepare_cached(&format!("SELECT {GRANT_COLS} FROM grants WHERE id = ?1"))?;
        Ok(stmt.query_row([id], grant_from_row).optional()?)
    }

    /// Newest first.
    pub fn list(&self, filter: ListFilter) -> anyhow::Result<Vec<Grant>> {
        // One fixed statement: a NULL parameter disables its condition; LIMIT -1 is no limit.
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {GRANT_COLS} FROM grants \
             WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR intent = ?2) \
             ORDER BY issued_at DESC, rowid DESC LIMIT ?3"
        ))?;
        let limit = if filter.limit == 0 { -1 } else { i64::try_from(filter.limit).unwrap_or(-1) };
        let rows = stmt.query_map(
            params![filter.state.map(GrantState::as_str), filter.intent, limit],
            grant_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every active grant, oldest first: what the kernel maps are rebuilt from at start.
    pub fn active(&self) -> anyhow::Result<Vec<Grant>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {GRANT_COLS} FROM grants WHERE state = 'active' ORDER BY issued_at, rowid"
        ))?;
        let rows = stmt.query_map([], grant_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks every active grant whose expiry is at or before `now` as expired, in one
    /// transaction, and returns them (soonest expiry first). Grants that expired while the
    /// daemon was down are caught by the first call after start.
    pub fn expire_due(&mut self, now: DateTime<Utc>) -> anyhow::Result<Vec<Grant>> {
        let tx = self.conn.transaction()?;
        let mut expired: Vec<Grant> = {
            // ended_at is the expiry itself, not when we noticed: that is when the grant ended.
            let mut stmt = tx.prepare_cached(&format!(
                "UPDATE grants SET state = 'expired', ended_at = expires_at, end_reason = 'ttl' \
                 WHERE state = 'active' AND expires_at_unix_ns <= ?1 RETURNING {GRANT_COLS}"
            ))?;
            let rows = stmt.query_map([unix_ns(now)], grant_from_row)?;
            rows.collect::<Result<_, _>>()?
        };
        expired.sort_by(|a, b| a.expires_at.cmp(&b.expires_at).then_with(|| a.id.cmp(&b.id)));
        let detail = format!("ttl elapsed; recorded at {}", ts(now));
        for g in &expired {
            add_event(&tx, &g.id, g.expires_at, "expired", &detail)?;
        }
        tx.commit()?;
        Ok(expired)
    }

    /// The grant's history, in order.
    pub fn events(&self, id: &str) -> anyhow::Result<Vec<LedgerEvent>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, grant_id, time, kind, detail FROM grant_events \
             WHERE grant_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok(LedgerEvent {
                seq: r.get(0)?,
                grant_id: r.get(1)?,
                time: parse_ts(r, 2)?,
                kind: r.get(3)?,
                detail: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// (state, count) for every state that has grants, by state name.
    pub fn count_by_state(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state, COUNT(*) FROM grants GROUP BY state ORDER BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Records in one transaction; see `Ledger::batch` and `Ledger::batch_unguarded`.
pub struct Batch<'a> {
    tx: rusqlite::Transaction<'a>,
    /// Each record in its own savepoint.
    guarded: bool,
}

impl Batch<'_> {
    /// `f` inside a savepoint (guarded: kept if it succeeds, rolled back if not), or
    /// directly on the transaction (unguarded).
    fn each<T>(&mut self, f: impl FnOnce(&Connection) -> anyhow::Result<T>) -> anyhow::Result<T> {
        if !self.guarded {
            return f(&self.tx);
        }
        let sp = self.tx.savepoint()?;
        let r = f(&sp)?;
        sp.commit()?;
        Ok(r)
    }

    pub fn insert(&mut self, g: &Grant) -> anyhow::Result<()> {
        self.each(|c| insert_on(c, g))
    }

    pub fn set_state(
        &mut self,
        id: &str,
        state: GrantState,
        reason: &str,
        at: DateTime<Utc>,
    ) -> anyhow::Result<bool> {
        self.each(|c| set_state_on(c, id, state, reason, at))
    }

    pub fn record_use(&mut self, id: &str, detail: &str) -> anyhow::Result<()> {
        self.each(|c| add_event(c, id, Utc::now(), "used", detail))
    }

    /// Writes every record kept; on error none of them is written.
    pub fn commit(self) -> anyhow::Result<()> {
        Ok(self.tx.commit()?)
    }
}

fn insert_on(c: &Connection, g: &Grant) -> anyhow::Result<()> {
    insert_grant_on(c, g, "INSERT")?;
    add_event(c, &g.id, g.issued_at, "issued", "")
}

/// Inserts `g` with its 'issued' event unless a grant with its id exists: whether it did.
fn insert_if_absent_on(c: &Connection, g: &Grant) -> anyhow::Result<bool> {
    if insert_grant_on(c, g, "INSERT OR IGNORE")? == 0 {
        return Ok(false);
    }
    add_event(c, &g.id, g.issued_at, "issued", "")?;
    Ok(true)
}

/// The grant row alone; rows changed.
fn insert_grant_on(c: &Connection, g: &Grant, verb: &str) -> anyhow::Result<usize> {
    c.prepare_cached(&format!(
        "{verb} INTO grants ({GRANT_COLS}, expires_at_unix_ns) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    ))?
    .execute(params![
        g.id,
        g.intent,
        serde_json::to_string(&g.subject)?,
        serde_json::to_string(&g.secrets)?,
        serde_json::to_string(&g.destinations)?,
        ts(g.issued_at),
        ts(g.expires_at),
        g.state.as_str(),
        g.token,
        g.ttl_clamped_from,
        unix_ns(g.expires_at),
    ])
    .with_context(|| format!("inserting grant {:?}", g.id))
}

fn set_state_on(
    c: &Connection,
    id: &str,
    state: GrantState,
    reason: &str,
    at: DateTime<Utc>,
) -> anyhow::Result<bool> {
    let kind = match state {
        GrantState::Active => bail!("a grant cannot be made active again"),
        GrantState::Expired => "expired",
        GrantState::Revoked => "revoked",
        GrantState::Ended => "subtree_ended",
    };
    let changed = c
        .prepare_cached(
            "UPDATE grants SET state = ?2, ended_at = ?3, end_reason = ?4 \
                 WHERE id = ?1 AND state = 'active'",
        )?
        .execute(params![id, state.as_str(), ts(at), reason])?;
    if changed == 1 {
        add_event(c, id, at, kind, reason)?;
    }
    Ok(changed == 1)
}

fn add_event(
    conn: &Connection,
    id: &str,
    at: DateTime<Utc>,
    kind: &str,
    detail: &str,
) -> anyhow::Result<()> {
    conn.prepare_cached(
        "INSERT INTO grant_events (grant_id, time, kind, detail) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![id, ts(at), kind, detail])
    .with_context(|| format!("recording {kind} event of grant {id:?}"))?;
    Ok(())
}

/// Fixed-width RFC 3339 (always 9 fraction digits, "Z") so text order is time order and the
/// value reads back to the same nanosecond.
fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// Beyond year 2262 a grant is as good as never-expiring; saturate rather than fail.
fn unix_ns(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(if t.timestamp() < 0 { i64::MIN } else { i64::MAX })
}

fn conversion_err(
    idx: usize,
    e: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e))
}

fn parse_ts(r: &Row, idx: usize) -> rusqlite::Result<DateTime<Utc>> {
    let s: String = r.get(idx)?;
    DateTime::parse_from_rfc3339(&s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| conversion_err(idx, e))
}

fn parse_json<T: serde::de::DeserializeOwned>(r: &Row, idx: usize) -> rusqlite::Result<T> {
    let s: String = r.get(idx)?;
    serde_json::from_str(&s).map_err(|e| conversion_err(idx, e))
}

/// Reads the GRANT_COLS columns, in order.
fn grant_from_row(r: &Row) -> rusqlite::Result<Grant> {
    let state: String = r.get(7)?;
    Ok(Grant {
        id: r.get(0)?,
        intent: r.get(1)?,
        subject: parse_json(r, 2)?,
        secrets: parse_json(r, 3)?,
        destinations: parse_json(r, 4)?,
        issued_at: parse_ts(r, 5)?,
        expires_at: parse_ts(r, 6)?,
        state: GrantState::parse(&state).ok_or_else(|| {
            conversion_err(7, std::io::Error::other(format!("unknown grant state {state:?}")))
        })?,
        token: r.get(8)?,
        ttl_clamped_from: r.get(9)?,
    })
}

/// Checkpoints the WAL into the database once a second, off the request path (PASSIVE: it
/// never blocks writers). Ends when the connection cannot be opened any more.
fn spawn_checkpointer(path: &Path) {
    let path = path.to_path_buf();
    let _ = std::thread::Builder::new().name("ledger-checkpoint".into()).spawn(move || {
        super::sched::set_thread_nice(super::sched::BACKGROUND_NICE);
        let Ok(conn) = Connection::open(&path) else { return };
        let _ = conn.busy_timeout(Duration::from_millis(100));
        loop {
            std::thread::sleep(Duration::from_secs(1));
            if !path.exists() {
                return;
            }
            let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mint::model::Subject;

    use tempfile::TempDir;

    fn scratch() -> TempDir {
        tempfile::Builder::new().prefix("enforcer-mint-test-").tempdir().unwrap()
    }

    fn grant(id: &str, intent: &str, issued: DateTime<Utc>, ttl_s: i64) -> Grant {
        Grant {
            id: id.into(),
            intent: intent.into(),
            subject: Subject {
                pid: 4242,
                start_ns: 987_654_321,
                exe: "/usr/bin/deployer".into(),
                exe_sha256: "cd".repeat(32),
                uid: 1000,
                gid: 1001,
                cgroup: "/ci.slice/job-1".into(),
            },
            secrets: vec!["deploy-key".into(), "db-password".into()],
            destinations: vec!["192.0.2.10/32:443".into()],
            // Odd nanoseconds on purpose: they must come back exactly.
            issued_at: issued,
            expires_at: issued + chrono::Duration::nanoseconds(ttl_s * 1_000_000_000 + 7),
            state: GrantState::Active,
            token: "eyJhbGciOiJFZERTQSJ9.e30.c2ln".into(),
            ttl_clamped_from: None,
        }
    }

    #[test]
    fn insert_reopen_read_back_exactly() {
        let dir = scratch();
        let now = Utc::now();
        let mut g1 = grant("g_one", "deploy", now, 300);
        g1.ttl_clamped_from = Some("2h".into());
        let g2 = grant("g_two", "backup", now + chrono::Duration::milliseconds(1), 300);
        {
            let mut l = Ledger::open(dir.path()).unwrap();
            l.insert(&g1).unwrap();
            l.insert(&g2).unwrap();
            assert!(l.insert(&g1).is_err(), "duplicate id must fail");
        }
        let meta = std::fs::metadata(dir.path().join(LEDGER_FILE)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);

        let l = Ledger::open(dir.path()).unwrap();
        assert_eq!(l.get("g_one").unwrap().unwrap(), g1);
        assert_eq!(l.get("g_two").unwrap().unwrap(), g2);
        assert_eq!(l.get("g_nope").unwrap(), None);
        assert_eq!(l.active().unwrap(), vec![g1.clone(), g2.clone()]);
        assert_eq!(l.list(ListFilter::default()).unwrap(), vec![g2.clone(), g1.clone()]);
        let ev = l.events("g_one").unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].kind.as_str(), ev[0].time), ("issued", g1.issued_at));
    }

    #[test]
    fn set_state_only_from_active() {
        let dir = scratch();
        let mut l = Ledger::open(dir.path()).unwrap();
        let now = Utc::now();
        l.insert(&grant("g_a", "deploy", now, 300)).unwrap();
        assert!(l.set_state("g_a", GrantState::Revoked, "revoked by uid 0", now).unwrap());
        // Second ending of the same grant loses and writes nothing.
        assert!(!l.set_state("g_a", GrantState::Expired, "ttl", now).unwrap());
        assert!(!l.set_state("g_missing", GrantState::Revoked, "x", now).unwrap());
        assert!(l.set_state("g_a", GrantState::Active, "x", now).is_err());
        assert_eq!(l.get("g_a").unwrap().unwrap().state, GrantState::Revoked);
        let kinds: Vec<_> = l.events("g_a").unwrap().into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["issued", "revoked"]);

        l.insert(&grant("g_b", "deploy", now, 300)).unwrap();
        assert!(l.set_state("g_b", GrantState::Ended, "subtree exited", now).unwrap());
        assert_eq!(l.events("g_b").unwrap()[1].kind, "subtree_ended");

        l.record_use("g_b", "connect 192.0.2.10:443").unwrap();
        assert_eq!(l.events("g_b").unwrap()[2].detail, "connect 192.0.2.10:443");
        assert!(l.record_use("g_missing", "x").is_err(), "events need a known grant");
    }

    #[test]
    fn expire_due_catches_downtime_expiries() {
        let dir = scratch();
        let t0 = Utc::now();
        {
            let mut l = Ledger::open(dir.path()).unwrap();
            l.insert(&grant("g_short", "deploy", t0, 1)).unwrap();
            l.insert(&grant("g_long", "deploy", t0, 3600)).unwrap();
            l.insert(&grant("g_rev", "deploy", t0, 1)).unwrap();
            l.set_state("g_rev", GrantState::Revoked, "cli", t0).unwrap();
            assert!(l.expire_due(t0).unwrap().is_empty());
        }
        // "Daemon down" for a minute, then restart.
        let later = t0 + chrono::Duration::seconds(60);
        let mut l = Ledger::open(dir.path()).unwrap();
        let exp = l.expire_due(later).unwrap();
        assert_eq!(exp.len(), 1);
        assert_eq!(exp[0].id, "g_short");
        assert_eq!(exp[0].state, GrantState::Expired);
        assert!(l.expire_due(later).unwrap().is_empty(), "expired once only");
        let active: Vec<_> = l.active().unwrap().into_iter().map(|g| g.id).collect();
        assert_eq!(active, ["g_long"]);
        let ev = l.events("g_short").unwrap();
        assert_eq!((ev[1].kind.as_str(), ev[1].time), ("expired", exp[0].expires_at));

        // Exactly at expires_at it is due (a use at expiry is already a violation).
        let g = l.get("g_long").unwrap().unwrap();
        assert!(l.expire_due(g.expires_at - chrono::Duration::nanoseconds(1)).unwrap().is_empty());
        assert_eq!(l.expire_due(g.expires_at).unwrap().len(), 1);

        let counts = l.count_by_state().unwrap();
        assert_eq!(counts, vec![("expired".to_string(), 2), ("revoked".to_string(), 1)]);
    }

    #[test]
    fn list_filters_and_hostile_input() {
        let dir = scratch();
        let mut l = Ledger::open(dir.path()).unwrap();
        let t0 = Utc::now();
        for i in 0..5 {
            let intent = if i % 2 == 0 { "deploy" } else { "backup" };
            l.insert(&grant(&format!("g_{i}"), intent, t0 + chrono::Duration::seconds(i), 300))
                .unwrap();
        }
        l.set_state("g_4", GrantState::Revoked, "x", t0).unwrap();
        let ids = |v: Vec<Grant>| v.into_iter().map(|g| g.id).collect::<Vec<_>>();
        let f = |state, intent: Option<&str>, limit| ListFilter {
            state,
            intent: intent.map(str::to_owned),
            limit,
        };
        assert_eq!(ids(l.list(f(None, None, 2)).unwrap()), ["g_4", "g_3"]);
        assert_eq!(ids(l.list(f(None, Some("deploy"), 0)).unwrap()), ["g_4", "g_2", "g_0"]);
        assert_eq!(
            ids(l.list(f(Some(GrantState::Active), Some("deploy"), 0)).unwrap()),
            ["g_2", "g_0"]
        );
        assert_eq!(ids(l.list(f(Some(GrantState::Revoked), None, 10)).unwrap()), ["g_4"]);

        // Injection attempts are just strange strings.
        let evil = "g_x'; DROP TABLE grants; --";
        l.insert(&grant(evil, "' OR '1'='1", t0, 300)).unwrap();
        assert_eq!(l.get(evil).unwrap().unwrap().id, evil);
        assert!(l.get("' OR '1'='1").unwrap().is_none());
        assert!(l.list(f(None, Some("' OR '1'='1"), 0)).unwrap().len() == 1);
        assert_eq!(l.list(f(None, None, 0)).unwrap().len(), 6);
    }

    #[test]
    fn refuses_newer_schema_and_loose_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch();
        drop(Ledger::open(dir.path()).unwrap());
        let path = dir.path().join(LEDGER_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Ledger::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("0644"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = format!("{:#}", Ledger::open(dir.path()).err().unwrap());
        assert!(err.contains("newer"), "{err}");
    }

    /// A group commit: records that fail roll back alone, the rest are written together,
    /// and nothing is visible before the commit.
    #[test]
    fn batch_keeps_the_records_that_succeed() {
        let dir = scratch();
        let mut l = Ledger::open(dir.path()).unwrap();
        let now = Utc::now();
        l.insert(&grant("g_old", "deploy", now, 300)).unwrap();
        {
            let mut b = l.batch().unwrap();
            b.insert(&grant("g_a", "deploy", now, 300)).unwrap();
            assert!(b.insert(&grant("g_old", "deploy", now, 300)).is_err(), "duplicate id");
            assert!(b.set_state("g_old", GrantState::Revoked, "revoked", now).unwrap());
            assert!(b.record_use("g_missing", "x").is_err());
            b.insert(&grant("g_b", "deploy", now, 300)).unwrap();
            // Dropped without commit: none of it is written.
        }
        assert!(l.get("g_a").unwrap().is_none());
        assert_eq!(l.get("g_old").unwrap().unwrap().state, GrantState::Active);
        let mut b = l.batch().unwrap();
        b.insert(&grant("g_a", "deploy", now, 300)).unwrap();
        assert!(b.insert(&grant("g_old", "deploy", now, 300)).is_err());
        b.record_use("g_a", "connect 192.0.2.10:443").unwrap();
        b.insert(&grant("g_b", "deploy", now, 300)).unwrap();
        b.commit().unwrap();
        assert_eq!(l.active().unwrap().len(), 3);
        let kinds: Vec<_> = l.events("g_a").unwrap().into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["issued", "used"]);
        assert_eq!(l.events("g_old").unwrap().len(), 1, "the failed duplicate added no event");
    }

    /// Not a gate (timing varies by machine): prints the insert rate. Run with --nocapture.
    #[test]
    fn insert_rate() {
        let dir = scratch();
        let mut l = Ledger::open(dir.path()).unwrap();
        let t0 = Utc::now();
        let n = 2_000;
        let start = std::time::Instant::now();
        for i in 0..n {
            l.insert(&grant(&format!("g_{i:026}"), "deploy", t0, 300)).unwrap();
        }
        let el = start.elapsed();
        println!(
            "ledger: {n} inserts in {el:?}: {:.0}/s, {:.1} us each",
            n as f64 / el.as_secs_f64(),
            el.as_secs_f64() * 1e6 / n as f64
        );
        assert_eq!(l.active().unwrap().len(), n);
    }
}
