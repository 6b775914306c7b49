//! `enforcer secret get NAME`: a daemon-held secret's value on stdout (exactly the file's
//! content), for a caller whose process subtree holds a live grant covering NAME (the daemon
//! checks this in the kernel's maps). Refused: the daemon's JSON error on stderr, exit 1.
use std::io::Write;
use std::process::ExitCode;

use anyhow::{Result, bail};

use super::status::socket;
use crate::api::client;

/// The value, or the daemon's JSON error.
pub fn fetch(name: &str) -> Result<std::result::Result<String, serde_json::Value>> {
    let path = format!("/v1/secrets/{}", crate::aws::sigv4::uri_encode(name));
    let (status, v) = client::request(&socket(), "GET", &path, None)?;
    if !(200..300).contains(&status) {
        return Ok(Err(v));
    }
    match v["value"].as_str() {
        Some(s) => Ok(Ok(s.to_string())),
        None => bail!("the daemon answered without a value"),
    }
}

pub fn get(name: &str) -> Result<ExitCode> {
    match fetch(name)? {
        Ok(value) => {
            let mut out = std::io::stdout().lock();
            out.write_all(value.as_bytes())?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}", serde_json::to_string(&e)?);
            Ok(ExitCode::from(1))
        }
    }
}
