//! The environment `enforcer run` gives CMD from its grant: for intents with `[intent.aws]`
//! the SDKs' container-credentials variables, and `--env VAR=secret:NAME` daemon-held
//! secrets. The parent passes the grant's variables through the release pipe; the secrets
//! are fetched by the child itself once it holds the grant, so the daemon attests the very
//! process that will exec CMD (the parent holds no grant and could not get them).
use std::os::fd::RawFd;

use anyhow::{Result, bail};
use serde_json::Value;

/// `VAR=secret:NAME` -> (VAR, NAME).
pub fn secret_specs(env: &[String]) -> Result<Vec<(String, String)>> {
    env.iter()
        .map(|spec| {
            let Some((var, src)) = spec.split_once('=') else {
                bail!("--env {spec:?}: expected VAR=secret:NAME");
            };
            let ok_var = var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let Some(name) = src.strip_prefix("secret:").filter(|n| !n.is_empty()) else {
                bail!("--env {spec:?}: the value must be secret:NAME");
            };
            if !ok_var {
                bail!("--env {spec:?}: {var:?} is not a valid environment variable name");
            }
            Ok((var.to_string(), name.to_string()))
        })
        .collect()
}

/// NUL-terminated `KEY=VALUE` pairs the grant brings.
pub fn grant_env(grant: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let aws = &grant["aws"];
    for (key, field) in [
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "credentials_full_uri"),
        ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "authorization_token_file"),
    ] {
        if let Some(v) = aws[field].as_str() {
            out.extend_from_slice(format!("{key}={v}").as_bytes());
            out.push(0);
        }
    }
    out
}

/// In the forked child, single-threaded, after the go byte: reads the rest of the pipe and
/// sets those variables, then fetches each secret. Exits 1 without running CMD when a
/// secret is refused.
pub fn apply_in_child(fd: RawFd, secrets: &[(String, String)]) {
    let mut rest = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n <= 0 {
            break;
        }
        rest.extend_from_slice(&buf[..n as usize]);
    }
    for pair in rest.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        let pair = String::from_utf8_lossy(pair);
        if let Some((k, v)) = pair.split_once('=') {
            // SAFETY: the forked child is single-threaded.
            unsafe { std::env::set_var(k, v) };
        }
    }
    for (var, name) in secrets {
        match super::secret::fetch(name) {
            Ok(Ok(value)) => {
                // As `$(cat file)` would: one trailing newline is not part of the value.
                let value = value.strip_suffix('\n').unwrap_or(&value);
                // SAFETY: the forked child is single-threaded.
                unsafe { std::env::set_var(var, value) };
            }
            Ok(Err(e)) => {
                eprintln!("enforcer run: secret {name} refused: {e}");
                unsafe { libc::_exit(1) };
            }
            Err(e) => {
                eprintln!("enforcer run: secret {name}: {e:#}");
                unsafe { libc::_exit(1) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let ok = secret_specs(&["DB_PASSWORD=secret:db".into()]).unwrap();
        assert_eq!(ok, vec![("DB_PASSWORD".into(), "db".into())]);
        assert!(secret_specs(&["DB=db".into()]).is_err());
        assert!(secret_specs(&["1X=secret:db".into()]).is_err());
        assert!(secret_specs(&["X=secret:".into()]).is_err());
        assert!(secret_specs(&["X".into()]).is_err());
    }

    #[test]
    fn grant_variables() {
        let g = serde_json::json!({"aws": {"credentials_full_uri": "http://127.0.0.1:1/v1/aws/credentials", "authorization_token_file": "/run/enforcer/aws/g_x.token"}});
        let env = String::from_utf8(grant_env(&g)).unwrap();
        assert_eq!(
            env,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:1/v1/aws/credentials\0AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=/run/enforcer/aws/g_x.token\0"
        );
        assert!(grant_env(&serde_json::json!({})).is_empty());
    }
}
