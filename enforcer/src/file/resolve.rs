//! Secret paths to watch targets.
use std::path::PathBuf;

use crate::policy::Secret;

#[derive(Debug, Clone)]
pub struct Target {
    pub secret: String,
    pub path: PathBuf,
    /// (dev, ino) the path resolved to last time, following symlinks.
    pub inode: Option<(u64, u64)>,
    /// Named literally in the policy (a missing one is worth a warning); glob and `~`
    /// expansions of the built-in catalog are not.
    pub explicit: bool,
    /// Resolved at least once (so a path missing from the start is reported once).
    pub checked: bool,
}

pub fn targets(secrets: &[Secret]) -> Vec<Target> {
    let mut out = Vec::new();
    for s in secrets {
        let explicit_paths: Vec<&String> = s
            .paths
            .iter()
            .filter(|p| !p.contains(['*', '?', '[']) && !p.starts_with('~'))
            .collect();
        for path in s.expand_paths() {
            let explicit = explicit_paths.iter().any(|p| PathBuf::from(p) == path);
            out.push(Target {
                secret: s.name.clone(),
                path,
                inode: None,
                explicit,
                checked: false,
            });
        }
    }
    out
}
