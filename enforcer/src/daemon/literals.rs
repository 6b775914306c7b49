//! The values of watched secrets, for the command-line redactor: a secret that is not in a
//! recognisable format (a database password, an internal token) is still replaced by its
//! fingerprint when a process passes it on a command line (`sh -c 'tool "$(cat secret)"'`).
//!
//! Read at start and at each policy reload, never on a decision. The values stay in the
//! daemon's memory; they are never logged or written anywhere.
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::policy::Secret;
use crate::redact;

/// Bytes read of one secret file: larger files are key stores, not values on a command line.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Every literal worth redacting from the watched secrets' current contents (and the
/// daemon-held ones' `value_file`s).
pub fn of(secrets: &[Secret]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = secrets
        .iter()
        .flat_map(|s| s.expand_paths().into_iter().chain(s.value_file.clone()))
        .filter_map(|p| read_regular(&p))
        .flat_map(|bytes| redact::literals_from_secret(&bytes))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// A regular file's first MAX_SECRET_BYTES; None for anything else. Opened non-blocking and
/// checked on the open fd, so a FIFO or device swapped in at the path cannot stall the read.
pub fn read_regular(path: &Path) -> Option<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    let kind = f.metadata().ok()?.file_type();
    if !kind.is_file() || kind.is_fifo() {
        return None;
    }
    let mut buf = Vec::new();
    f.take(MAX_SECRET_BYTES).read_to_end(&mut buf).ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_regular_files_only_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "db_password = s3cr3t-Value-42\n").unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; 200 * 1024]).unwrap();
        assert!(read_regular(&fifo).is_none(), "a FIFO is never read (it would block)");
        assert_eq!(read_regular(&big).unwrap().len(), MAX_SECRET_BYTES as usize);
        let secret = Secret {
            name: "db".into(),
            paths: vec![file.display().to_string(), fifo.display().to_string()],
            destinations: vec![],
            kind: Default::default(),
            value_file: None,
        };
        let lits = of(&[secret]);
        assert!(lits.iter().any(|l| l == b"s3cr3t-Value-42"), "{lits:?}");
    }
}
