//! `enforcer report census [--since DUR] [--format json|markdown|sarif] [--state-dir DIR]`:
//! the credential census over the stored events (see `crate::report`).
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::report::{self, render};

pub fn census(
    since: Option<String>,
    format: &str,
    state_dir: Option<PathBuf>,
    output: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let render_fn: fn(&report::census::Census) -> String = match format {
        "json" => render::json,
        "markdown" | "md" => render::markdown,
        "sarif" => render::sarif,
        other => bail!("--format {other:?}: expected json, markdown or sarif"),
    };
    let cutoff = match since {
        Some(s) => {
            let d = humantime::parse_duration(&s)
                .with_context(|| format!("--since {s:?}: expected a duration such as 10m or 2h"))?;
            Some(chrono::Utc::now() - chrono::Duration::from_std(d).context("--since too large")?)
        }
        None => None,
    };
    let dir = super::events::state_dir(state_dir);
    if !dir.join(crate::store::FILE_NAME).exists() {
        bail!("no events stored under {} (is this the daemon's state_dir?)", dir.display());
    }
    let c = report::census_from_store(&dir, cutoff)?;
    let mut text = render_fn(&c);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    match output {
        Some(p) => std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?,
        None => {
            use std::io::Write;
            std::io::stdout().lock().write_all(text.as_bytes())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
