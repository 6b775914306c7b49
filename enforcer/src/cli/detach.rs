//! `enforcer detach [--config PATH]`: remove the kernel programs and maps a stopped daemon
//! left pinned. A daemon stopping (SIGTERM, SIGINT, upgrade, crash) leaves its links and
//! maps pinned so enforcement continues and the next daemon adopts them; this is the one
//! way to take them out (the Debian package runs it on removal).
use std::path::PathBuf;
use std::process::ExitCode;

use crate::policy;

/// Refuses while a daemon holds the single-instance lock of the config's runtime dir (it
/// would lose its programs from under it); otherwise unpins every link and map under
/// `pin_dir` and prints each path removed.
pub fn run(config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let cfg = match policy::load(config.as_deref()) {
        Ok(c) => c,
        Err(diags) => {
            eprintln!("{diags}");
            eprintln!("enforcer: invalid configuration; nothing was detached");
            return Ok(ExitCode::from(2));
        }
    };
    // The daemon's lock: held here while unpinning, so no daemon starts meanwhile. With no
    // runtime dir no daemon has run there.
    let _lock = if cfg.runtime_dir.is_dir() {
        match crate::daemon::lock::acquire(&cfg.runtime_dir) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("enforcer: {e:#}");
                eprintln!(
                    "enforcer: refusing to detach while a daemon runs; stop it first (systemctl stop enforcer)"
                );
                return Ok(ExitCode::from(1));
            }
        }
    } else {
        None
    };
    let removed = crate::kernel::detach_pins(&cfg.pin_dir)?;
    if removed.is_empty() {
        println!("nothing pinned under {}", cfg.pin_dir.display());
    } else {
        for p in &removed {
            println!("removed {}", p.display());
        }
        println!(
            "detached: {} pins removed from {}; connects are no longer judged until a daemon starts",
            removed.len(),
            cfg.pin_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
