//! `enforcer grant request|list|revoke|verify`.
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::status::socket;
use crate::api::client;

/// One API call; a JSON error from the daemon becomes a message and exit 1.
pub fn call(method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let (status, v) = client::request(&socket(), method, path, body)?;
    answer(status, v)
}

/// A 2xx answer's JSON; a JSON error from the daemon becomes a message.
fn answer(status: u16, v: Value) -> Result<Value> {
    if !(200..300).contains(&status) {
        let code = v["error"]["code"].as_str().unwrap_or("error");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        bail!("daemon refused ({status} {code}): {msg}");
    }
    Ok(v)
}

pub fn request(
    intent: &str,
    ttl: Option<String>,
    pid: Option<u32>,
    json_out: bool,
) -> Result<ExitCode> {
    let mut body = json!({"intent": intent});
    if let Some(t) = ttl {
        body["ttl"] = json!(t);
    }
    // Pin the target now: a pidfd first, then its start time while the pidfd shows it alive.
    // The daemon binds only the process that started then; if the target exits and its pid
    // is reused while the request is on its way, the request is refused, never misbound.
    let g = match pid {
        Some(p) => {
            let (pidfd, ticks) = crate::mint::attest::pin_target(p)
                .map_err(|e| anyhow::anyhow!("--pid {p}: {e}"))?;
            body["pid"] = json!(p);
            body["pid_start_time"] = json!(ticks);
            use std::os::fd::AsFd;
            let (status, v) =
                client::request_with_fd(&socket(), "POST", "/v1/grants", &body, pidfd.as_fd())?;
            answer(status, v)?
        }
        None => call("POST", "/v1/grants", Some(body))?,
    };
    if json_out {
        println!("{}", serde_json::to_string_pretty(&g)?);
    } else {
        println!("{}", g["id"].as_str().unwrap_or_default());
        eprintln!(
            "granted intent {} to pid {} until {}{}",
            g["intent"].as_str().unwrap_or_default(),
            g["subject"]["pid"],
            g["expires_at"].as_str().unwrap_or_default(),
            g["ttl_clamped"].as_str().map(|c| format!(" ({c})")).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(json_out: bool, all: bool) -> Result<ExitCode> {
    let path = if all { "/v1/grants" } else { "/v1/grants?state=active" };
    let v = call("GET", path, None)?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let grants = v["grants"].as_array().cloned().unwrap_or_default();
    println!("{:<30} {:<16} {:<8} {:>8} {:<32} EXE", "ID", "INTENT", "STATE", "PID", "EXPIRES");
    for g in &grants {
        println!(
            "{:<30} {:<16} {:<8} {:>8} {:<32} {}",
            g["id"].as_str().unwrap_or_default(),
            g["intent"].as_str().unwrap_or_default(),
            g["state"].as_str().unwrap_or_default(),
            g["subject"]["pid"],
            g["expires_at"].as_str().unwrap_or_default(),
            g["subject"]["exe"].as_str().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn revoke(id: &str) -> Result<ExitCode> {
    let g = call("DELETE", &format!("/v1/grants/{}", encode(id)), None)?;
    println!("revoked {}", g["id"].as_str().unwrap_or(id));
    Ok(ExitCode::SUCCESS)
}

/// Checks a token against the daemon's published key; prints its claims.
pub fn verify(token: &str) -> Result<ExitCode> {
    let jwks = call("GET", "/v1/keys", None)?;
    let jwk = jwks["keys"].get(0).context("the daemon published no key")?;
    match crate::mint::token::verify_with_jwk(token.trim(), jwk, chrono::Utc::now()) {
        Ok(v) => {
            let claims = serde_json::to_value(&v.claims)?;
            println!("{}", serde_json::to_string_pretty(&claims)?);
            if v.expired {
                eprintln!("signature valid, but the token has EXPIRED");
                return Ok(ExitCode::from(1));
            }
            eprintln!("signature valid; token not expired");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("enforcer: invalid token: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// Grant ids are [a-z0-9_]; anything else is percent-encoded rather than trusted in a path.
fn encode(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
