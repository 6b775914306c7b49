//! The ledger's journal: every issued grant is appended here, one JSON line in one write(2),
//! before the Mint API answers 201; the ledger writer then copies records into SQLite in large
//! groups and empties the journal once all of them are committed there.
//!
//! Why: an issuer used to wait for its own SQLite commit on the writer thread (a thread hop
//! there and back, and a WAL commit of ~7 pages per grant when requests arrive one by one),
//! which made the commit the largest part of an issue's latency and of its CPU. The journal
//! append gives the same durability as that commit did (WAL, `synchronous = NORMAL`: in the
//! OS's page cache when the call returns, so it survives a crash or kill of the daemon, not an
//! OS crash, which also ends the kernel maps and the processes holding grants), at the cost
//! of one small write on the request path.
//!
//! After a crash, `Ledger::open` inserts what the journal holds and SQLite does not (records
//! already there are kept as they are, since later changes may have been recorded on them)
//! before anything reads the ledger, so the restore sees every grant that was answered 201.
//! The file holds grant tokens: created 0600, refused if anyone else may read it.
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, bail};

use super::model::Grant;
use super::timing::Stamps;

pub const JOURNAL_FILE: &str = "ledger.journal";
/// The journal is emptied once it holds this much and all of it is in SQLite: a truncate
/// (which appenders wait for) every few hundred grants rather than after every group.
const EMPTY_AT: u64 = 256 * 1024;

pub struct Journal {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    /// Records appended since the daemon started (the last one's sequence number).
    appended: u64,
    /// Every record up to this sequence number is committed in SQLite.
    applied: u64,
    /// Bytes in the file.
    len: u64,
    /// A record could not be committed in SQLite: the journal is not emptied again before
    /// the next start, whose replay puts it there.
    held: bool,
}

impl Journal {
    /// Opens (creating if needed) `<state_dir>/ledger.journal`; what it holds is for
    /// `pending`, which must be read (and applied) before the first `append`.
    pub fn open(state_dir: &Path) -> anyhow::Result<Journal> {
        let path = state_dir.join(JOURNAL_FILE);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let md = file.metadata()?;
        if md.mode() & 0o077 != 0 {
            bail!(
                "refusing ledger journal {}: mode {:04o} lets others read grant tokens; chmod 0600 it",
                path.display(),
                md.mode() & 0o777
            );
        }
        let inner = Inner { file, appended: 0, applied: 0, len: md.len(), held: false };
        Ok(Journal { path, inner: Mutex::new(inner) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The grants the journal holds, in the order they were issued. A last line without its
    /// newline is a write the daemon died in (its issuer got no 201) and is skipped.
    pub fn pending(&self) -> anyhow::Result<Vec<Grant>> {
        let f =
            File::open(&self.path).with_context(|| format!("reading {}", self.path.display()))?;
        let mut out = Vec::new();
        let mut r = BufReader::new(f);
        let mut line = String::new();
        let mut n = 0;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 || !line.ends_with('\n') {
                break;
            }
            n += 1;
            let g: Grant = serde_json::from_str(&line)
                .with_context(|| format!("{}:{n}: not a grant record", self.path.display()))?;
            out.push(g);
        }
        Ok(out)
    }

    /// Empties the journal: every record in it is committed in SQLite.
    pub fn clear(&self) -> io::Result<()> {
        let mut i = self.lock();
        i.file.set_len(0)?;
        i.len = 0;
        i.applied = i.appended;
        Ok(())
    }

    /// Appends `g` (one write) and then calls `then` with it and its sequence number, under
    /// the journal's lock, so records reach `then` in journal order. An error writes nothing
    /// further (a short write is cut off again) and does not call `then`.
    pub fn append<T>(&self, g: Grant, then: impl FnOnce(Grant, u64) -> T) -> io::Result<T> {
        self.append_stamped(g, &mut Stamps::off(), then)
    }

    /// `append`, marking its stages in `stamps`.
    pub fn append_stamped<T>(
        &self,
        g: Grant,
        stamps: &mut Stamps,
        then: impl FnOnce(Grant, u64) -> T,
    ) -> io::Result<T> {
        let mut line = serde_json::to_vec(&g).map_err(io::Error::other)?;
        line.push(b'\n');
        stamps.mark("journal_json");
        let mut i = self.lock();
        stamps.mark("journal_lock");
        let written = i.file.write_all(&line);
        stamps.mark("journal_write");
        if let Err(e) = written {
            // A partial line would make every later record unreadable.
            let len = i.len;
            let _ = i.file.set_len(len);
            return Err(e);
        }
        i.len += line.len() as u64;
        i.appended += 1;
        let seq = i.appended;
        Ok(then(g, seq))
    }

    /// Every record up to `seq` is committed in SQLite: once that holds for every record
    /// appended and the file has grown past EMPTY_AT, it is emptied (a record left in it is
    /// skipped by the replay, which keeps what SQLite has).
    pub fn applied(&self, seq: u64) {
        let mut i = self.lock();
        i.applied = i.applied.max(seq);
        if i.applied == i.appended && i.len >= EMPTY_AT && !i.held {
            match i.file.set_len(0) {
                Ok(()) => i.len = 0,
                Err(e) => tracing::warn!("ledger journal: cannot empty it: {e}"),
            }
        }
    }

    /// Keeps every record until the next start: one could not be committed in SQLite.
    pub fn hold(&self) {
        let mut i = self.lock();
        if !i.held {
            tracing::error!(
                "ledger journal {}: kept until the next start (a grant is not in SQLite)",
                self.path.display()
            );
        }
        i.held = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mint::ledger::{LEDGER_FILE, Ledger};
    use crate::mint::model::{GrantState, Subject};
    use crate::mint::writer::LedgerTx;
    use chrono::Utc;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};

    fn grant(id: &str) -> Grant {
        let now = Utc::now();
        Grant {
            id: id.into(),
            intent: "deploy".into(),
            subject: Subject {
                pid: 4242,
                start_ns: 987_654_321,
                exe: "/usr/bin/deployer".into(),
                exe_sha256: "cd".repeat(32),
                uid: 1000,
                gid: 1001,
                cgroup: "/ci.slice/job-1".into(),
            },
            secrets: vec!["deploy-key".into()],
            destinations: vec!["192.0.2.10/32:443".into()],
            issued_at: now,
            expires_at: now + chrono::Duration::nanoseconds(300_000_000_007),
            state: GrantState::Active,
            token: "eyJhbGciOiJFZERTQSJ9.e30.c2ln".into(),
            ttl_clamped_from: Some("2h".into()),
        }
    }

    fn scratch() -> tempfile::TempDir {
        tempfile::Builder::new().prefix("enforcer-journal-test-").tempdir().unwrap()
    }

    /// A daemon killed after answering 201 but before the writer's commit: the next start
    /// finds the grant in the ledger, and a grant whose later change SQLite already has keeps it.
    #[test]
    fn replay_recovers_what_sqlite_missed() {
        let dir = scratch();
        let (g1, g2) = (grant("g_only_in_journal"), grant("g_in_both"));
        {
            let mut l = Ledger::open(dir.path()).unwrap();
            let j = l.journal();
            j.append(g1.clone(), |_, _| ()).unwrap();
            j.append(g2.clone(), |_, _| ()).unwrap();
            l.insert(&g2).unwrap();
            assert!(l.set_state("g_in_both", GrantState::Revoked, "revoked", Utc::now()).unwrap());
            // The daemon died inside the next append: a line without its newline.
            let mut f =
                OpenOptions::new().append(true).open(dir.path().join(JOURNAL_FILE)).unwrap();
            f.write_all(br#"{"id":"g_torn","intent":"dep"#).unwrap();
        }
        let l = Ledger::open(dir.path()).unwrap();
        assert_eq!(l.get("g_only_in_journal").unwrap().unwrap(), g1);
        let kinds: Vec<_> =
            l.events("g_only_in_journal").unwrap().into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["issued"]);
        assert_eq!(l.get("g_in_both").unwrap().unwrap().state, GrantState::Revoked);
        assert_eq!(l.get("g_torn").unwrap(), None);
        assert_eq!(std::fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len(), 0);
        let mode = std::fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(dir.path().join(LEDGER_FILE).exists());
    }

    #[test]
    fn refuses_a_journal_others_can_read() {
        let dir = scratch();
        let path = dir.path().join(JOURNAL_FILE);
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Journal::open(dir.path()).err().expect("0644 refused");
        assert!(format!("{e:#}").contains("chmod 0600"), "{e:#}");
    }

    /// The writer puts every journaled grant into SQLite (in groups), announces each once,
    /// and empties the journal once it is all there.
    #[tokio::test]
    async fn writer_copies_the_journal_into_sqlite_and_empties_it() {
        let dir = scratch();
        let ledger = Arc::new(Mutex::new(Ledger::open(dir.path()).unwrap()));
        let (tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let writer = LedgerTx::spawn(ledger.clone(), tx);
        let n = 1200;
        for i in 0..n {
            writer.insert(grant(&format!("g_{i:05}"))).unwrap();
        }
        writer.barrier().await;
        let l = ledger.lock().unwrap();
        let all = l.list(crate::mint::ledger::ListFilter::default()).unwrap();
        assert_eq!(all.len(), n);
        let mut announced = 0;
        while let Ok(c) = changes.try_recv() {
            assert!(matches!(c, crate::mint::registry::GrantChange::Issued(_)));
            announced += 1;
        }
        assert_eq!(announced, n);
        // Emptied past EMPTY_AT; what is left is less than that.
        let len = std::fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len();
        assert!(len < EMPTY_AT, "journal still {len} bytes");
        assert!(n as u64 * 400 > EMPTY_AT, "the test must write past EMPTY_AT");
    }

    /// A group in which one record fails (a duplicate id) is written again record by
    /// record: the others are committed and announced, the failed one is not, and the
    /// journal is kept for the next start. A barrier answers without waiting out the
    /// writer's group window.
    #[tokio::test]
    async fn a_failing_record_fails_alone_and_barriers_close_the_group() {
        let dir = scratch();
        let ledger = Arc::new(Mutex::new(Ledger::open(dir.path()).unwrap()));
        ledger.lock().unwrap().insert(&grant("g_old")).unwrap();
        let (tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let writer = LedgerTx::spawn(ledger.clone(), tx);
        for id in ["g_a", "g_old", "g_b"] {
            writer.insert(grant(id)).unwrap();
        }
        writer.set_state("g_a", GrantState::Revoked, "revoked by test", Utc::now(), None);
        writer.barrier().await;
        {
            let l = ledger.lock().unwrap();
            assert_eq!(l.get("g_a").unwrap().unwrap().state, GrantState::Revoked);
            assert_eq!(l.get("g_b").unwrap().unwrap().state, GrantState::Active);
            assert_eq!(l.events("g_old").unwrap().len(), 1, "the duplicate added nothing");
        }
        let mut announced = Vec::new();
        while let Ok(crate::mint::registry::GrantChange::Issued(g)) = changes.try_recv() {
            announced.push(g.id);
        }
        assert_eq!(announced, ["g_a", "g_b"]);
        // Held: the journal keeps every record until the next start.
        let held = Journal::open(dir.path()).unwrap().pending().unwrap();
        assert_eq!(held.len(), 3);
        // A barrier right after a record: answered once that record is written, long before
        // a writer that waited out its window for each of 20 groups would be.
        let t0 = std::time::Instant::now();
        for i in 0..20 {
            writer.insert(grant(&format!("g_next_{i}"))).unwrap();
            writer.barrier().await;
            assert!(ledger.lock().unwrap().get(&format!("g_next_{i}")).unwrap().is_some());
        }
        assert!(t0.elapsed() < std::time::Duration::from_millis(180), "{:?}", t0.elapsed());
    }
}
