//! cgroup id <-> path on the cgroup2 mount. A cgroup2 directory's inode number is the id
//! that bpf_get_current_cgroup_id() returns.
//!
//! A leaf module: `proc` attributes processes to cgroups with it and `kernel::policy` resolves
//! `[[agent]]` cgroup selectors with it, without either depending on the other.
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Bounds on a rescan so a huge or hostile cgroup tree cannot stall the daemon.
const MAX_DIRS: usize = 100_000;
const MIN_RESCAN_INTERVAL: Duration = Duration::from_millis(200);

pub struct CgroupResolver {
    mount: PathBuf,
    by_id: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl CgroupResolver {
    pub fn new(mount: PathBuf) -> Self {
        CgroupResolver { mount, by_id: HashMap::new(), last_scan: None }
    }

    /// The id of a cgroup given its path relative to the mount ("/a/b").
    pub fn id_of(&mut self, rel: &str) -> Option<u64> {
        let full = self.mount.join(rel.trim_start_matches('/'));
        let id = std::fs::metadata(full).ok()?.ino();
        self.by_id.insert(id, normalize(rel));
        Some(id)
    }

    pub fn path(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.by_id.get(&id) {
            return Some(p.clone());
        }
        if self.last_scan.is_some_and(|t| t.elapsed() < MIN_RESCAN_INTERVAL) {
            return None;
        }
        self.rescan();
        self.by_id.get(&id).cloned()
    }

    fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        let mut stack = vec![self.mount.clone()];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > MAX_DIRS {
                break;
            }
            let Ok(md) = std::fs::metadata(&dir) else { continue };
            let rel = dir
                .strip_prefix(&self.mount)
                .map(|p| format!("/{}", p.display()))
                .unwrap_or_else(|_| "/".into());
            self.by_id.insert(md.ino(), normalize(&rel));
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
}

fn normalize(rel: &str) -> String {
    let t = rel.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else if t.starts_with('/') {
        t.into()
    } else {
        format!("/{t}")
    }
}

/// True when cgroup path `path` is `root` or below it (both relative to the mount).
pub fn is_within(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('/');
    root.is_empty() || path == root || path.starts_with(&format!("{root}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within() {
        assert!(is_within("/a/b", "/"));
        assert!(is_within("/a/b", "/a"));
        assert!(is_within("/a", "/a"));
        assert!(!is_within("/ab", "/a"));
        assert!(!is_within("/", "/a"));
    }
}
