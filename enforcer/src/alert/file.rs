//! File sink: JSON Lines, 0600, rotated by size keeping `max_backups`, and reopened on request
//! (SIGHUP) so logrotate's move-and-signal works without copytruncate.
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};

use super::Item;
use crate::policy::FileSinkConfig;

pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    max_backups: u32,
    out: Option<(BufWriter<File>, u64)>,
    pub reopen: Arc<AtomicBool>,
}

impl FileSink {
    pub fn new(s: &FileSinkConfig) -> FileSink {
        FileSink {
            path: s.path.clone(),
            max_bytes: s.max_bytes,
            max_backups: s.max_backups,
            out: None,
            reopen: Arc::new(AtomicBool::new(false)),
        }
    }

    fn open(&mut self) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .with_context(|| format!("open {}", self.path.display()))?;
        let size = f.metadata()?.len();
        self.out = Some((BufWriter::with_capacity(256 * 1024, f), size));
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        if let Some((mut w, _)) = self.out.take() {
            w.flush()?;
        }
        if self.max_backups == 0 {
            std::fs::remove_file(&self.path).ok();
        } else {
            let _ = std::fs::remove_file(numbered(&self.path, self.max_backups));
            for i in (1..self.max_backups).rev() {
                let _ = std::fs::rename(numbered(&self.path, i), numbered(&self.path, i + 1));
            }
            std::fs::rename(&self.path, numbered(&self.path, 1))
                .with_context(|| format!("rotate {}", self.path.display()))?;
        }
        self.open()
    }

    pub fn send(&mut self, batch: &[Item]) -> Result<()> {
        if self.reopen.swap(false, Ordering::Relaxed)
            && let Some((mut w, _)) = self.out.take()
        {
            w.flush()?;
        }
        if self.out.is_none() {
            self.open()?;
        }
        for item in batch {
            let len = item.payload.len() as u64 + 1;
            let size = self.out.as_ref().map_or(0, |o| o.1);
            if size > 0 && size + len > self.max_bytes {
                self.rotate()?;
            }
            let (w, size) = self.out.as_mut().expect("opened");
            w.write_all(item.payload.as_bytes())?;
            w.write_all(b"\n")?;
            *size += len;
        }
        // Acknowledged only once the bytes are in the file (page cache: survives a daemon kill).
        let res = self.out.as_mut().expect("opened").0.flush();
        if res.is_err() {
            self.out = None;
        }
        Ok(res?)
    }

    pub fn reset(&mut self) {
        self.out = None;
    }
}

fn numbered(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}
