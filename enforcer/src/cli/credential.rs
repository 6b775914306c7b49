//! `enforcer credential aws --intent NAME`: the AWS CLI/SDK `credential_process` command.
//! Asks the daemon over the mint socket, where the caller is attested by the kernel: only
//! a process holding a live grant for NAME (e.g. inside `enforcer run --intent NAME`) gets
//! credentials. Prints the `credential_process` JSON (Version 1) on stdout; on refusal the
//! daemon's JSON error goes to stderr and the exit status is 1.
use std::process::ExitCode;

use anyhow::Result;

use super::status::socket;
use crate::api::client;

pub fn aws(intent: &str) -> Result<ExitCode> {
    let path = format!("/v1/credentials/aws?intent={}", crate::aws::sigv4::uri_encode(intent));
    let (status, v) = client::request(&socket(), "GET", &path, None)?;
    if !(200..300).contains(&status) {
        eprintln!("{}", serde_json::to_string(&v)?);
        return Ok(ExitCode::from(1));
    }
    println!("{}", serde_json::to_string(&v)?);
    Ok(ExitCode::SUCCESS)
}
