use std::path::PathBuf;
use std::process::ExitCode;

use crate::{daemon, policy};

/// Validates the config first: an invalid one exits 2 before anything touches the kernel.
pub fn run(config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    init_logging();
    let cfg = match policy::load(config.as_deref()) {
        Ok(c) => c,
        Err(diags) => {
            eprintln!("{diags}");
            eprintln!("enforcer: invalid configuration; nothing was loaded into the kernel");
            return Ok(ExitCode::from(2));
        }
    };
    let setup = daemon::prepare(cfg, config)?;
    daemon::run(setup)?;
    Ok(ExitCode::SUCCESS)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ENFORCER_LOG")
        .unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
