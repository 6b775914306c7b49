use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::store;

pub fn state_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("ENFORCER_STATE_DIR").map(PathBuf::from)).unwrap_or_else(
        || {
            crate::policy::load(None)
                .map(|c| c.state_dir)
                .unwrap_or_else(|_| PathBuf::from("/var/lib/enforcer"))
        },
    )
}

pub fn run(
    follow: bool,
    since: Option<String>,
    format: &str,
    state_dir_flag: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let ocsf = match format {
        "json" => false,
        "ocsf" => true,
        _ => bail!(
            "--format {format:?}: expected \"json\" (enforcer.event/v1 JSON Lines) or \"ocsf\" (OCSF 1.3 JSON Lines)"
        ),
    };
    let cutoff = match since {
        Some(s) => {
            let d = humantime::parse_duration(&s)
                .with_context(|| format!("--since {s:?}: expected a duration such as 10m or 2h"))?;
            Some(chrono::Utc::now() - chrono::Duration::from_std(d).context("--since too large")?)
        }
        None => None,
    };
    let dir = state_dir(state_dir_flag);
    if !dir.join(store::FILE_NAME).exists() && !follow {
        bail!("no events stored under {} (is this the daemon's state_dir?)", dir.display());
    }
    let print = |line: &str, e: &crate::event::Event| -> anyhow::Result<()> {
        if let Some(c) = cutoff {
            let t = chrono::DateTime::parse_from_rfc3339(&e.time)
                .map(|t| t.with_timezone(&chrono::Utc));
            if t.is_ok_and(|t| t < c) {
                return Ok(());
            }
        }
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if ocsf {
            writeln!(out, "{}", crate::alert::ocsf::to_ocsf(e))?;
        } else {
            writeln!(out, "{line}")?;
        }
        if follow {
            out.flush()?;
        }
        Ok(())
    };
    let offset = store::read_all(&dir, print)?;
    if follow {
        store::follow(&dir, offset, print)?;
    }
    Ok(ExitCode::SUCCESS)
}
