//! Events stored under the state dir as JSON Lines (`events.jsonl`, rotated by size), so
//! `enforcer events` works after the fact and across daemon restarts.
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::event::Event;

pub const FILE_NAME: &str = "events.jsonl";
const ROTATE_BYTES: u64 = 64 * 1024 * 1024;
const BACKUPS: u32 = 3;

pub struct EventStore {
    path: PathBuf,
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
        Ok(EventStore { path, out: BufWriter::new(f), size })
    }

    pub fn append(&mut self, e: &Event) -> Result<()> {
        let mut line = serde_json::to_vec(e)?;
        line.push(b'\n');
        if self.size + line.len() as u64 > ROTATE_BYTES {
            self.rotate()?;
        }
        self.out.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// Makes appended events visible to readers; called after each batch.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        self.out.flush()?;
        for i in (1..BACKUPS).rev() {
            let _ = std::fs::rename(backup(&self.path, i), backup(&self.path, i + 1));
        }
        std::fs::rename(&self.path, backup(&self.path, 1))?;
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

/// Reads stored events oldest first (rotated backups, then the live file), calling `f`
/// with each raw line and its parsed event; unparsable lines are reported, not fatal.
pub fn read_all(state_dir: &Path, mut f: impl FnMut(&str, &Event) -> Result<()>) -> Result<u64> {
    let live = state_dir.join(FILE_NAME);
    let mut files: Vec<PathBuf> = (1..=BACKUPS).rev().map(|i| backup(&live, i)).filter(|p| p.exists()).collect();
    files.push(live.clone());
    let mut offset = 0;
    for path in files {
        let Ok(file) = File::open(&path) else { continue };
        let mut r = BufReader::new(file);
        offset = read_lines(&mut r, &path, &mut f)?;
    }
    Ok(offset)
}

fn read_lines(r: &mut BufReader<File>, path: &Path, f: &mut impl FnMut(&str, &Event) -> Result<()>) -> Result<u64> {
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
            Err(err) => eprintln!("enforcer: skipping unreadable line in {}: {err}", path.display()),
        }
    }
}

/// Follows the live file from `offset`, reopening it after rotation, until `f` errors.
pub fn follow(state_dir: &Path, mut offset: u64, mut f: impl FnMut(&str, &Event) -> Result<()>) -> Result<()> {
    let live = state_dir.join(FILE_NAME);
    let mut current: Option<(File, u64)> = None;
    loop {
        if current.is_none() {
            if let Ok(file) = File::open(&live) {
                let ino = file.metadata()?.ino();
                current = Some((file, ino));
            }
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
                current = None;
                offset = 0;
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
