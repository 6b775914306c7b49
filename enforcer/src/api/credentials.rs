//! Credentials served to granted processes: brokered AWS credentials (for
//! `credential_process` on the mint socket, and the loopback container endpoint in
//! `aws::endpoint`) and daemon-held static secrets (`enforcer secret get`). Every answer
//! rests on the kernel: the caller is attested (SO_PEERCRED + pidfd on the mint socket, the
//! socket table on the TCP endpoint) and must hold a live grant in `PROC_GRANTS`/`GRANTS`
//! that covers what it asks for. Every delivery and every refusal is an event; values never.
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::Arc;

use hyper::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

use super::error::ApiError;
use super::server::ApiState;
use crate::aws::sts::Minted;
use crate::aws::{Broker, CredentialNotice};
use crate::kernel::grants::ActMaps;
use crate::mint::attest::Requester;
use crate::mint::holder;
use crate::mint::view::{GrantFacts, ViewCell};

/// A daemon-held secret larger than this is refused (values, not key stores).
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// What the credential routes need beside the mint.
pub struct Delivery {
    /// PROC_GRANTS / GRANTS reads (who holds what), and taint for delivered secrets.
    pub maps: ActMaps,
    pub view: Arc<ViewCell>,
    pub broker: Arc<Broker>,
    pub notices: UnboundedSender<CredentialNotice>,
}

impl Delivery {
    fn notify(&self, n: CredentialNotice) {
        let _ = self.notices.send(n);
    }

    /// The live grants every one of `callers` holds.
    fn held_by_all(&self, callers: &[&Requester]) -> Vec<Arc<GrantFacts>> {
        let view = self.view.load();
        let Some(first) = callers.first() else { return Vec::new() };
        let mut held = holder::live_grants(&self.maps, &view, first.pid, first.start_ns);
        for c in &callers[1..] {
            let theirs = holder::live_grants(&self.maps, &view, c.pid, c.start_ns);
            held.retain(|g| theirs.iter().any(|t| t.id == g.id));
        }
        held
    }
}

/// Which grant's AWS credentials are asked for.
pub enum AwsAsk<'a> {
    /// `credential_process`: the caller's live grant of this intent.
    Intent(&'a str),
    /// The container endpoint: the grant its authorization token was issued for.
    Grant(&'a str),
}

/// AWS credentials for `callers` (all of them must hold the grant).
pub async fn aws_credentials(
    state: &ApiState,
    callers: &[&Requester],
    ask: AwsAsk<'_>,
) -> Result<(Arc<GrantFacts>, Minted), ApiError> {
    let d = &state.delivery;
    let pid = callers.first().map_or(0, |c| c.pid);
    let refuse = |verdict: &'static str,
                  g: Option<&GrantFacts>,
                  status: u16,
                  code: &'static str,
                  why: String| {
        d.notify(CredentialNotice::refused(
            "aws_credentials_refused",
            pid,
            verdict,
            g,
            None,
            why.clone(),
        ));
        ApiError::new(status, code, why)
    };
    let held = d.held_by_all(callers);
    let config =
        state.mint.config.lock().map(|c| c.clone()).unwrap_or_else(|e| e.into_inner().clone());
    let grant = match ask {
        AwsAsk::Intent(name) => {
            let Some(intent) = config.intent(name) else {
                return Err(ApiError::not_found("unknown_intent", format!("no intent {name:?}")));
            };
            if intent.aws.is_none() {
                return Err(ApiError::new(409, "not_aws", format!("intent {name} has no [intent.aws]")));
            }
            held.iter().find(|g| g.intent == name).cloned().ok_or_else(|| {
                refuse("no_grant", None, 403, "no_grant", format!("pid {pid} holds no live grant for intent {name}"))
            })?
        }
        AwsAsk::Grant(id) => held.iter().find(|g| g.id == id).cloned().ok_or_else(|| {
            let ended = d.view.load().grants.values().chain(d.view.load().ended.values()).find(|g| g.id == id).cloned();
            let verdict = match &ended {
                Some(g) if g.revoked => "revoked",
                Some(g) if g.expires_at <= chrono::Utc::now() => "expired",
                _ => "no_grant",
            };
            let who: Vec<String> = callers.iter().map(|c| c.pid.to_string()).collect();
            refuse(verdict, ended.as_deref(), 403, "no_grant", format!(
                "grant {id} is not live in every process at the client end of the connection (pids {})",
                who.join(", ")
            ))
        })?,
    };
    let Some(aws) = config.intent(&grant.intent).and_then(|i| i.aws.clone()) else {
        return Err(refuse(
            "no_grant",
            Some(&grant),
            409,
            "not_aws",
            format!("intent {} has no [intent.aws]", grant.intent),
        ));
    };
    let minted = d.broker.credentials(&grant, &aws, pid).await.map_err(|e| {
        refuse("no_grant", Some(&grant), 502, "sts_failed", format!("STS refused or failed: {e}"))
    })?;
    // The STS call took time: the grant may have ended meanwhile.
    if !d.held_by_all(callers).iter().any(|g| g.id == grant.id) {
        return Err(refuse(
            "revoked",
            Some(&grant),
            403,
            "no_grant",
            format!("grant {} ended while its credentials were minted", grant.id),
        ));
    }
    Ok((grant, minted))
}

/// GET /v1/credentials/aws?intent=NAME: the `credential_process` answer.
pub async fn credential_process(
    state: &ApiState,
    peer: &Requester,
    query: &str,
) -> Result<(StatusCode, Value), ApiError> {
    let intent = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("intent="))
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::bad_request("invalid_query", "give ?intent=NAME"))?;
    let (_, m) = aws_credentials(state, &[peer], AwsAsk::Intent(intent)).await?;
    Ok((
        StatusCode::OK,
        json!({
            "Version": 1,
            "AccessKeyId": m.access_key_id,
            "SecretAccessKey": m.secret_access_key,
            "SessionToken": m.session_token,
            "Expiration": m.expiration.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }),
    ))
}

/// GET /v1/secrets/NAME: a daemon-held secret's value, to a process holding a live grant
/// that covers it. The reader is tainted with the secret, as if it had opened its file.
pub async fn secret(
    state: &ApiState,
    peer: &Requester,
    name: &str,
) -> Result<(StatusCode, Value), ApiError> {
    let d = &state.delivery;
    let refuse = |verdict: &'static str,
                  g: Option<&GrantFacts>,
                  status: u16,
                  code: &'static str,
                  why: String| {
        d.notify(CredentialNotice::refused(
            "secret_refused",
            peer.pid,
            verdict,
            g,
            Some(name),
            why.clone(),
        ));
        ApiError::new(status, code, why)
    };
    let config =
        state.mint.config.lock().map(|c| c.clone()).unwrap_or_else(|e| e.into_inner().clone());
    let Some(secret) = config.secret(name) else {
        return Err(refuse("no_grant", None, 404, "unknown_secret", format!("no secret {name:?}")));
    };
    let Some(file) = secret.value_file.clone() else {
        return Err(refuse(
            "no_grant",
            None,
            409,
            "not_held",
            format!("secret {name} is not held by the daemon (no value_file)"),
        ));
    };
    let held = d.held_by_all(&[peer]);
    let Some(grant) = held.iter().find(|g| g.secrets.iter().any(|s| s == name)).cloned() else {
        return Err(refuse(
            "no_grant",
            None,
            403,
            "no_grant",
            format!("pid {} holds no live grant covering secret {name}", peer.pid),
        ));
    };
    let value = tokio::task::spawn_blocking(move || read_held(&file))
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
        .map_err(|e| {
            refuse(
                "no_grant",
                Some(&grant),
                500,
                "secret_unavailable",
                format!("secret {name}: {e}"),
            )
        })?;
    // History counts: the reader's connections are judged as if it had read the file.
    let bits = d.view.load().secret_bits(name);
    if bits != 0 {
        let _ = crate::act::write_state(&d.maps, peer.pid, 0, bits, 0);
        if let Some(pg) = d.maps.state_of(peer.pid) {
            let _ = d.maps.taint_grants(&pg.grants, bits);
        }
    }
    d.notify(CredentialNotice {
        kind: "secret_delivered",
        pid: peer.pid,
        exe: Some(peer.exe.trim_end_matches(" (deleted)").to_string()),
        verdict: "allowed",
        action: "allowed",
        severity: "info",
        grant: Some(crate::aws::notice::grant_ref(&grant)),
        secrets: vec![name.to_string()],
        credentials: vec![],
        decision_path: vec![format!(
            "pid {} holds grant {} covering secret {name} (kernel PROC_GRANTS, GRANTS)",
            peer.pid, grant.id
        )],
        message: format!(
            "daemon-held secret {name} delivered to pid {} under grant {} (intent {})",
            peer.pid, grant.id, grant.intent
        ),
    });
    Ok((StatusCode::OK, json!({"name": name, "value": value})))
}

/// A held secret's value: a regular file owned by root, unreadable to group and others.
fn read_held(path: &std::path::Path) -> Result<String, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let md = f.metadata().map_err(|e| e.to_string())?;
    if !md.file_type().is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if md.uid() != 0 || md.mode() & 0o077 != 0 {
        return Err(format!(
            "{} must be owned by root and readable by root only (mode 0600 or 0400)",
            path.display()
        ));
    }
    let mut buf = Vec::new();
    f.take(MAX_SECRET_BYTES + 1).read_to_end(&mut buf).map_err(|e| e.to_string())?;
    if buf.len() as u64 > MAX_SECRET_BYTES {
        return Err(format!("larger than {MAX_SECRET_BYTES} bytes"));
    }
    String::from_utf8(buf).map_err(|_| "not UTF-8 text".to_string())
}
