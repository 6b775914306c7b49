//! Configuration and policy: loading, validation with `file:line:col` errors, and the model the
//! daemon runs on.
//!
//! A load either returns a complete `Config` or every error it found; nothing is half-applied.

// The daemon consumes most of this API; until every part of it is wired up, unused items are
// expected here rather than a sign of dead code.
#![allow(dead_code, unused_imports)]

mod aws;
mod destination;
mod diag;
mod dns;
mod duration;
mod limits;
mod model;
mod parse;
mod sink;
mod spiffe;
#[cfg(test)]
mod tests;
mod url;

use std::io;
use std::path::{Path, PathBuf};

pub use aws::{AwsIntent, AwsSettings, StsEndpoint, parse_endpoint};
pub use destination::{Destination, PortRange};
pub use diag::{Diagnostic, Diagnostics};
pub use dns::{DEFAULT_MIN_TTL, DnsConfig, NssResolve, Refuse};
pub use duration::{format_duration, parse_duration};
pub use limits::Limits;
pub use model::{
    AGENT_ON_VIOLATION, AgentSelector, Config, DEFAULT_MAX_TTL, DEFAULT_PIN_DIR,
    DEFAULT_RUNTIME_DIR, DEFAULT_STATE_DIR, DEFAULT_TTL, FileBackend, Intent, Mode, OnViolation,
    Secret, SecretKind,
};

pub use sink::{
    ClientAuth, DEFAULT_SINK_MAX_BACKUPS, DEFAULT_SINK_MAX_BYTES, FileSinkConfig, HecSinkConfig,
    HttpsSinkConfig, OutboxConfig, Redacted, Severity, SinkConfig, SinkFormat, SinkKind,
    SyslogSinkConfig, TlsOptions, VERDICTS,
};
pub use spiffe::{
    DEFAULT_KEY_ROTATION, DEFAULT_SVID_TTL, OidcTls, SpiffeConfig, render_spiffe_id, valid_path,
    valid_trust_domain,
};
pub use url::{HttpsUrl, UrlError};

use parse::{Loader, Origin, Settings};

/// Used by `load(None)` when it exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/enforcer/enforcer.toml";

/// Source name of the built-in config.
pub const EMBEDDED_SOURCE: &str = "embedded default";

/// The built-in config: monitor mode over the catalog of well-known credential files.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Loads the daemon's configuration: `path`, or else `DEFAULT_CONFIG_PATH` if it exists, or else
/// the embedded default. Then every `*.toml` in `policy_dir` (sorted by name) is merged in.
pub fn load(path: Option<&Path>) -> Result<Config, Diagnostics> {
    let mut loader = Loader::default();
    let (settings, source) = match path {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(text) => (loader.config(display(p), text, Origin::File(p)), display(p)),
            Err(e) => {
                loader.unreadable(display(p), &e);
                (None, display(p))
            }
        },
        None => {
            let p = Path::new(DEFAULT_CONFIG_PATH);
            match std::fs::read_to_string(p) {
                Ok(text) => (loader.config(display(p), text, Origin::File(p)), display(p)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => embedded(&mut loader),
                // Present but unreadable: falling back to the default would silently drop the
                // operator's policy.
                Err(e) => {
                    loader.unreadable(display(p), &e);
                    (None, display(p))
                }
            }
        }
    };
    if let Some(dir) = settings.as_ref().and_then(|s| s.policy_dir.clone()) {
        merge_policy_dir(&mut loader, &dir);
    }
    loader.finish(settings, source)
}

fn embedded(loader: &mut Loader) -> (Option<Settings>, String) {
    (
        loader.config(EMBEDDED_SOURCE.into(), DEFAULT_TOML.into(), Origin::Embedded),
        EMBEDDED_SOURCE.into(),
    )
}

/// Parses one config text as if read from the file `name`, without reading anything else
/// (policy_dir is computed but not merged).
pub fn load_str(name: &str, text: &str) -> Result<Config, Diagnostics> {
    let mut loader = Loader::default();
    let settings = if name == EMBEDDED_SOURCE {
        loader.config(name.into(), text.into(), Origin::Embedded)
    } else {
        loader.config(name.into(), text.into(), Origin::File(Path::new(name)))
    };
    loader.finish(settings, name.into())
}

/// Checks a set of files together, as `enforcer policy check` does: the first file may be a full
/// config, the rest are policy fragments; names are resolved across the whole set. A directory
/// stands for its `*.toml` files, all fragments. policy_dir is not read: only the given files count.
pub fn check_files(paths: &[PathBuf]) -> Result<Config, Diagnostics> {
    let Some(first) = paths.first() else {
        return Err(Diagnostics(vec![Diagnostic {
            file: "enforcer".into(),
            line: 1,
            col: 1,
            message: "no files to check".into(),
        }]));
    };
    let mut loader = Loader::default();
    let mut rest = &paths[1..];
    let settings = if first.is_dir() {
        rest = paths;
        Some(Settings::defaults(Some(first.clone())))
    } else {
        match std::fs::read_to_string(first) {
            Ok(text) => loader.config(display(first), text, Origin::File(first)),
            Err(e) => {
                loader.unreadable(display(first), &e);
                None
            }
        }
    };
    for p in rest {
        if p.is_dir() {
            merge_policy_dir(&mut loader, p);
        } else {
            read_fragment(&mut loader, p);
        }
    }
    loader.finish(settings, display(first))
}

/// Merges every `*.toml` in `dir`, sorted by name. A missing directory holds no policy (the
/// default `policy.d` usually does not exist); any other error is reported.
fn merge_policy_dir(loader: &mut Loader, dir: &Path) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => return loader.unreadable(display(dir), &e),
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // Dotfiles are editor leftovers (`.#x.toml`), not policy.
            name.ends_with(".toml") && !name.starts_with('.') && !p.is_dir()
        })
        .collect();
    files.sort();
    for f in &files {
        read_fragment(loader, f);
    }
}

fn read_fragment(loader: &mut Loader, path: &Path) {
    match std::fs::read_to_string(path) {
        Ok(text) => loader.fragment(display(path), text),
        Err(e) => loader.unreadable(display(path), &e),
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
