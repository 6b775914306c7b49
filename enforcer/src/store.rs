//! Events stored under the state dir as JSON Lines (`events.jsonl`, rotated by size), so
//! `enforcer events` works after the fact and across daemon restarts.
//!
//! The same files are the alert outbox: each sink reads them from its own cursor
//! (`<state_dir>/sinks/<name>.cursor`, a `Position`). A position names a file generation by
//! inode (plus the id of its first event, in case an inode number is reused) and a byte offset,
//! so it stays valid when the live file is renamed to a backup. Rotation keeps every backup a
//! cursor still points into, up to the outbox's byte bound; past that bound the oldest one goes
//! anyway and a notice (see `take_notices`) says which sinks lost what.
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::sync::LockOrRecover;

pub const FILE_NAME: &str = "events.jsonl";
/// Where sinks keep their cursors.
pub const CURSOR_DIR: &str = "sinks";

// Outbox bounds, per state dir. Set from outside because the daemon opens the store before the
// alert module reads the config; `set_limits` applies from the next rotation on.
#[derive(Clone, Copy)]
struct Limits {
    rotate_bytes: u64,
    max_backups: u32,
    max_total_bytes: u64,
}

const DEFAULT_LIMITS: Limits =
    Limits { rotate_bytes: 64 * 1024 * 1024, max_backups: 3, max_total_bytes: 1024 * 1024 * 1024 };
static LIMITS: Mutex<Vec<(PathBuf, Limits)>> = Mutex::new(Vec::new());

pub fn set_limits(state_dir: &Path, rotate_bytes: u64, max_backups: u32, max_total_bytes: u64) {
    let l = Limits {
        rotate_bytes: rotate_bytes.max(4096),
        max_backups: max_backups.max(1),
        max_total_bytes,
    };
    let mut all = LIMITS.lock_or_recover();
    all.retain(|(d, _)| d != state_dir);
    all.push((state_dir.to_path_buf(), l));
}

fn limits(state_dir: &Path) -> Limits {
    let all = LIMITS.lock_or_recover();
    all.iter().find(|(d, _)| d == state_dir).map_or(DEFAULT_LIMITS, |(_, l)| *l)
}

static NOTICES: Mutex<Vec<String>> = Mutex::new(Vec::new());
const MAX_NOTICES: usize = 256;

/// Records a problem with delivery (outbox overflow, lost cursor) for the daemon to turn into an
/// agent event: an alert about the alert stream, never a quiet drop.
pub fn notice(msg: String) {
    tracing::warn!("{msg}");
    let mut n = NOTICES.lock_or_recover();
    if n.len() < MAX_NOTICES {
        n.push(msg);
    } else if n.len() == MAX_NOTICES {
        n.push("further outbox notices suppressed until these are taken".into());
    }
}

/// Notices recorded since the last call, oldest first.
pub fn take_notices() -> Vec<String> {
    std::mem::take(&mut *NOTICES.lock_or_recover())
}

pub struct EventStore {
    path: PathBuf,
    dir: PathBuf,
    rotate_bytes: u64,
    out: BufWriter<File>,
    size: u64,
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

impl EventStore {
    pub fn open(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(FILE_NAME);
        let f = open_append(&path)?;
        let size = f.metadata()?.len();
        let rotate_bytes = limits(state_dir).rotate_bytes;
        Ok(EventStore {
            path,
            dir: state_dir.to_path_buf(),
            rotate_bytes,
            out: BufWriter::new(f),
            size,
        })
    }

    pub fn append(&mut self, e: &Event) -> Result<()> {
        let mut line = serde_json::to_vec(e)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.rotate_bytes {
            self.rotate()?;
            self.rotate_bytes = limits(&self.dir).rotate_bytes;
        }
        self.out.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// Makes appended events visible to readers; called after each batch.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush()?;
        // Picks up `set_limits` made after open (the daemon opens the store first).
        self.rotate_bytes = limits(&self.dir).rotate_bytes;
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        self.out.flush()?;
        let dir = &self.dir;
        let lim = limits(dir);
        // After the shift, the live file is backup 1 and backup i is backup i+1.
        let mut shifted: Vec<(PathBuf, u64, u64)> = Vec::new(); // (current path, ino, size)
        for p in std::iter::once(self.path.clone()).chain(existing_backups(&self.path)) {
            if let Ok(m) = std::fs::metadata(&p) {
                shifted.push((p, m.ino(), m.len()));
            }
        }
        let cursors = read_cursors(dir);
        let needed = |ino: u64| {
            cursors
                .iter()
                .filter(|(_, p)| p.ino == ino)
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
        };
        let max_backups = lim.max_backups as usize;
        let max_total = lim.max_total_bytes;
        // Keep what no sink needs up to max_backups; keep older ones while some sink still
        // reads from them, but never past the byte bound.
        let oldest_needed =
            shifted.iter().rposition(|(_, ino, _)| !needed(*ino).is_empty()).map_or(0, |i| i + 1);
        let mut keep = max_backups.max(oldest_needed).min(shifted.len());
        while keep > max_backups && shifted[..keep].iter().map(|f| f.2).sum::<u64>() > max_total {
            keep -= 1;
        }
        for (p, ino, size) in shifted.iter().skip(keep) {
            let lagging = needed(*ino);
            if !lagging.is_empty() {
                notice(format!(
                    "alert outbox full ({} bytes bound): dropped {size} bytes of events not yet delivered to sink(s) {}",
                    max_total,
                    lagging.join(", ")
                ));
            }
            std::fs::remove_file(p).with_context(|| format!("remove {}", p.display()))?;
        }
        for i in (0..keep).rev() {
            std::fs::rename(&shifted[i].0, backup(&self.path, i as u32 + 1))?;
        }
        self.out = BufWriter::new(open_append(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

fn backup(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

/// Backups that exist, newest (.1) first; numbering is contiguous by construction.
fn existing_backups(live: &Path) -> Vec<PathBuf> {
    (1..).map(|i| backup(live, i)).take_while(|p| p.exists()).collect()
}

/// Every stored file, oldest first, the live file last.
pub fn generations(state_dir: &Path) -> Vec<PathBuf> {
    let live = state_dir.join(FILE_NAME);
    let mut files = existing_backups(&live);
    files.reverse();
    files.push(live);
    files
}

/// A point in the outbox: just after the last event a sink has delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub ino: u64,
    pub offset: u64,
    /// Id of the first event in that file, telling a reused inode number from the real file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_id: Option<String>,
}

pub fn cursor_path(state_dir: &Path, sink: &str) -> PathBuf {
    state_dir.join(CURSOR_DIR).join(format!("{sink}.cursor"))
}

/// Writes a cursor atomically (temp file + rename), so a kill leaves the old or the new one.
/// `T` is a `Position` or a struct flattening one (extra fields are ignored by rotation).
pub fn save_cursor<T: Serialize>(state_dir: &Path, sink: &str, pos: &T) -> Result<()> {
    let path = cursor_path(state_dir, sink);
    let tmp = path.with_extension("cursor.tmp");
    {
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("write {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec(pos)?)?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

fn read_cursors(state_dir: &Path) -> Vec<(String, Position)> {
    let Ok(entries) = std::fs::read_dir(state_dir.join(CURSOR_DIR)) else { return vec![] };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(".cursor")?.to_string();
            let pos = serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok()?;
            Some((name, pos))
        })
        .collect()
}

/// Id of the first event in a file (None if it has no complete line yet).
fn first_id(path: &Path) -> Option<String> {
    let mut r = BufReader::new(File::open(path).ok()?.take(1 << 20));
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    if !line.ends_with('\n') {
        return None;
    }
    id_of(line.trim_end())
}

fn id_of(line: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        id: String,
    }
    serde_json::from_str::<Id>(line).ok().map(|i| i.id)
}

/// Reads the outbox from a `Position` on, moving on through newer generations.
pub struct OutboxReader {
    state_dir: PathBuf,
    pub pos: Position,
    /// Index into `generations()` of the file being read (refreshed on each read).
    file: Option<(File, PathBuf)>,
}

pub struct Line {
    pub text: String,
    /// Position just after this line.
    pub after: Position,
}

impl OutboxReader {
    /// From `pos`, or from the end of the live file for a sink that has no cursor yet (a new
    /// sink gets what happens from now on, not the whole history).
    pub fn new(state_dir: &Path, pos: Option<Position>) -> OutboxReader {
        let pos = pos.unwrap_or_else(|| end_of_live(state_dir));
        OutboxReader { state_dir: state_dir.to_path_buf(), pos, file: None }
    }

    /// Finds the generation holding `pos`, oldest first; on a lost cursor resumes at the oldest
    /// stored event and reports the gap.
    fn locate(&mut self, sink: &str) -> Result<()> {
        let gens = generations(&self.state_dir);
        for p in &gens {
            let Ok(m) = std::fs::metadata(p) else { continue };
            if m.ino() != self.pos.ino {
                continue;
            }
            if self.pos.first_id.is_some() && self.pos.first_id != first_id(p) {
                continue;
            }
            self.file = Some((File::open(p)?, p.clone()));
            return Ok(());
        }
        let oldest = gens
            .iter()
            .find(|p| p.exists())
            .cloned()
            .unwrap_or_else(|| self.state_dir.join(FILE_NAME));
        if self.pos.ino != 0 {
            notice(format!(
                "sink {sink}: its place in the alert outbox was rotated away before delivery; resuming at the oldest stored event (events in between were lost for this sink)"
            ));
        }
        let f = File::open(&oldest).with_context(|| format!("open {}", oldest.display()))?;
        self.pos = Position { ino: f.metadata()?.ino(), offset: 0, first_id: first_id(&oldest) };
        self.file = Some((f, oldest));
        Ok(())
    }

    /// Up to `max` complete lines (or about `max_bytes`) after the current position; moves on to
    /// the next generation when a rotated file is exhausted. Empty when nothing new is there.
    pub fn read(&mut self, sink: &str, max: usize, max_bytes: usize) -> Result<Vec<Line>> {
        let mut out = Vec::new();
        for _ in 0..4 {
            if self.file.is_none() {
                self.locate(sink)?;
            }
            let (f, path) = self.file.as_mut().expect("located");
            let live = path.file_name().is_some_and(|n| n == FILE_NAME);
            let still_live =
                live && std::fs::metadata(&*path).is_ok_and(|m| m.ino() == self.pos.ino);
            if f.metadata()?.len() < self.pos.offset {
                // Truncated under us (not something the store does): start that file over.
                self.pos.offset = 0;
            }
            f.seek(SeekFrom::Start(self.pos.offset))?;
            let mut r = BufReader::with_capacity(256 * 1024, &*f);
            let mut bytes = 0;
            let mut buf = String::new();
            while out.len() < max && bytes < max_bytes {
                buf.clear();
                let n = r.read_line(&mut buf)?;
                if n == 0 || !buf.ends_with('\n') {
                    break; // a partial last line is still being written
                }
                self.pos.offset += n as u64;
                bytes += n;
                let text = buf.trim_end();
                if self.pos.first_id.is_none() && self.pos.offset == n as u64 {
                    self.pos.first_id = id_of(text);
                }
                if !text.is_empty() {
                    out.push(Line { text: text.to_string(), after: self.pos.clone() });
                }
            }
            if !out.is_empty() || still_live {
                return Ok(out);
            }
            // This generation was rotated and is read to its end (rotation flushed it whole):
            // go on with the next newer one.
            let gens = generations(&self.state_dir);
            let me = gens
                .iter()
                .position(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == self.pos.ino));
            let next = match me {
                Some(i) if i + 1 < gens.len() => gens[i + 1].clone(),
                _ => return Ok(out),
            };
            let f = match File::open(&next) {
                Ok(f) => f,
                Err(_) => return Ok(out),
            };
            self.pos = Position { ino: f.metadata()?.ino(), offset: 0, first_id: first_id(&next) };
            self.file = Some((f, next));
        }
        Ok(out)
    }

    /// Goes back to `pos` (a sink that must resend what was not acknowledged).
    pub fn rewind(&mut self, pos: Position) {
        self.pos = pos;
        self.file = None;
    }
}

fn end_of_live(state_dir: &Path) -> Position {
    let live = state_dir.join(FILE_NAME);
    match std::fs::metadata(&live) {
        Ok(m) => Position { ino: m.ino(), offset: m.len(), first_id: first_id(&live) },
        Err(_) => Position::default(),
    }
}

/// Reads stored events oldest first (rotated backups, then the live file), calling `f`
/// with each raw line and its parsed event; unparsable lines are reported, not fatal.
pub fn read_all(state_dir: &Path, mut f: impl FnMut(&str, &Event) -> Result<()>) -> Result<u64> {
    let mut offset = 0;
    for path in generations(state_dir) {
        let Ok(file) = File::open(&path) else { continue };
        let mut r = BufReader::new(file);
        offset = read_lines(&mut r, &path, &mut f)?;
    }
    Ok(offset)
}

fn read_lines(
    r: &mut BufReader<File>,
    path: &Path,
    f: &mut impl FnMut(&str, &Event) -> Result<()>,
) -> Result<u64> {
    let mut line = String::new();
    loop {
        let pos = r.stream_position()?;
        line.clear();
        let n = r.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            // A partial last line is still being written: leave it for the next read.
            return Ok(pos);
        }
        let text = line.trim_end();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<Event>(text) {
            Ok(e) => f(text, &e)?,
            Err(err) => {
                eprintln!("enforcer: skipping unreadable line in {}: {err}", path.display())
            }
        }
    }
}

/// Follows the live file from `offset`, reopening it after rotation, until `f` errors.
pub fn follow(
    state_dir: &Path,
    mut offset: u64,
    mut f: impl FnMut(&str, &Event) -> Result<()>,
) -> Result<()> {
    let live = state_dir.join(FILE_NAME);
    let mut current: Option<(File, u64)> = None;
    loop {
        if current.is_none()
            && let Ok(file) = File::open(&live)
        {
            let ino = file.metadata()?.ino();
            current = Some((file, ino));
        }
        if let Some((file, ino)) = current.as_mut() {
            let len = file.metadata()?.len();
            if len < offset {
                offset = 0; // truncated
            }
            file.seek(SeekFrom::Start(offset))?;
            let mut r = BufReader::new(file.try_clone()?);
            offset = read_lines(&mut r, &live, &mut f)?;
            let rotated = std::fs::metadata(&live).map(|m| m.ino() != *ino).unwrap_or(false);
            if rotated {
                // Finish the rotated file first: lines written just before rotation are there.
                file.seek(SeekFrom::Start(offset))?;
                let mut r = BufReader::new(file.try_clone()?);
                read_lines(&mut r, &live, &mut f)?;
                current = None;
                offset = 0;
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
