//! File sink: JSON Lines, 0600, rotated by size keeping `max_backups`, and reopened on request
//! (SIGHUP) so logrotate's move-and-signal works without copytruncate.
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
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
            .read(true) // to check the last byte, see below
            .mode(0o600)
            .open(&self.path)
            .with_context(|| format!("open {}", self.path.display()))?;
        let mut size = f.metadata()?.len();
        // A daemon killed while a batch was being written (a batch larger than the buffer
        // goes out in several writes) leaves a torn last line. The batch was not
        // acknowledged and is written again, so end the fragment here: otherwise the
        // first redelivered record would be glued to it and a SIEM would lose both.
        if size > 0 && !ends_with_newline(&f)? {
            (&f).write_all(b"\n").with_context(|| format!("write {}", self.path.display()))?;
            size += 1;
        }
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

fn ends_with_newline(f: &File) -> Result<bool> {
    let mut r = f.try_clone()?;
    let mut last = [0u8; 1];
    // O_APPEND writes ignore the offset, so moving it for this read is harmless.
    r.seek(SeekFrom::End(-1))?;
    Ok(r.read(&mut last)? == 1 && last[0] == b'\n')
}

fn numbered(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}
