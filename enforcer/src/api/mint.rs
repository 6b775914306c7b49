//! The Mint API handlers: issue, list, get, revoke grants, and the token public key. The
//! registry lock is taken only for in-memory work and kernel map writes; ledger reads take
//! the ledger's own lock, after the writer has caught up with what was sent before.
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use hyper::StatusCode;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::mint::attest::{self, Requester};
use crate::mint::error::MintError;
use crate::mint::ledger::{Ledger, ListFilter};
use crate::mint::model::{Grant, GrantState};
use crate::mint::ratelimit::RateLimiter;
use crate::mint::registry::{Registry, resolve_destinations};
use crate::mint::request;
use crate::mint::writer::LedgerTx;
use crate::policy::Config;

pub struct MintState {
    pub registry: Arc<Mutex<Registry>>,
    /// For reads (list, get, history); the writer thread shares it.
    ledger: Arc<Mutex<Ledger>>,
    ledger_tx: LedgerTx,
    /// The policy in force; replaced atomically on reload.
    pub config: Mutex<Arc<Config>>,
    pub limiter: Mutex<RateLimiter>,
    /// exe sha256 by (dev, ino, size, mtime): hashing a large binary on every request
    /// would cost milliseconds.
    exe_hashes: Mutex<HashMap<(u64, u64, u64, i64), String>>,
    jwks: Value,
    /// The AWS broker, set once the daemon has it: grants of `[intent.aws]` intents get a
    /// token for its endpoint (and may connect to it).
    pub aws: std::sync::OnceLock<Arc<crate::aws::Broker>>,
}

/// Locks, carrying on past a panic elsewhere.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MintState {
    pub fn new(
        registry: Arc<Mutex<Registry>>,
        ledger: Arc<Mutex<Ledger>>,
        ledger_tx: LedgerTx,
        config: Arc<Config>,
        limiter: RateLimiter,
    ) -> Self {
        let jwks = lock(&registry).signer.jwks();
        MintState {
            registry,
            ledger,
            ledger_tx,
            config: Mutex::new(config),
            limiter: Mutex::new(limiter),
            exe_hashes: Mutex::new(HashMap::new()),
            jwks,
            aws: Default::default(),
        }
    }

    pub fn jwks(&self) -> Value {
        self.jwks.clone()
    }

    fn exe_sha256(&self, r: &Requester) -> Result<String, MintError> {
        let gone =
            || MintError::SubjectGone(format!("process {} exited during attestation", r.pid));
        let md = std::fs::metadata(format!("/proc/{}/exe", r.pid)).map_err(|_| gone())?;
        let key = (md.dev(), md.ino(), md.size(), md.mtime_nsec() + md.mtime() * 1_000_000_000);
        if let Some(h) = lock(&self.exe_hashes).get(&key) {
            return Ok(h.clone());
        }
        let h = r.exe_sha256().map_err(|_| gone())?;
        let mut cache = lock(&self.exe_hashes);
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(key, h.clone());
        Ok(h)
    }

    /// A grant: live state from memory, else the ledger (once the writer caught up).
    async fn grant(&self, id: &str) -> Result<Option<Grant>, MintError> {
        if let Some(g) = lock(&self.registry).live_grant(id) {
            return Ok(Some(g));
        }
        self.ledger_tx.barrier().await;
        lock(&self.ledger).get(id).map_err(|e| MintError::internal(format!("{e:#}")))
    }
}

pub fn grant_json(g: &Grant) -> Value {
    let mut v = json!({
        "id": g.id,
        "intent": g.intent,
        "subject": {"pid": g.subject.pid, "exe": g.subject.exe, "uid": g.subject.uid, "gid": g.subject.gid,
                    "cgroup": g.subject.cgroup, "exe_sha256": g.subject.exe_sha256, "start_ns": g.subject.start_ns},
        "secrets": g.secrets,
        "destinations": g.destinations,
        "issued_at": crate::event::rfc3339(g.issued_at),
        "expires_at": crate::event::rfc3339(g.expires_at),
        "state": g.state.as_str(),
        "token": g.token,
    });
    if let Some(c) = &g.ttl_clamped_from {
        v["ttl_clamped"] = json!(c);
    }
    v
}

/// POST /v1/grants.
pub async fn issue(
    m: &MintState,
    peer: &Requester,
    body: &[u8],
) -> Result<(StatusCode, Value), ApiError> {
    if let Err(retry) = lock(&m.limiter).check((peer.uid, peer.pid), Instant::now()) {
        return Err(MintError::RateLimited { pid: peer.pid, retry }.into());
    }
    let req = request::parse(body)?;
    let config = lock(&m.config).clone();
    let mut intent = config
        .intent(&req.intent)
        .ok_or_else(|| MintError::UnknownIntent(req.intent.clone()))?
        .clone();
    let broker = m.aws.get().filter(|_| intent.aws.is_some());
    // The subtree fetches its AWS credentials from the daemon's loopback endpoint.
    if let Some(d) = broker.and_then(|b| b.endpoint_destination()).and_then(|d| d.parse().ok()) {
        intent.destinations.push(d);
    }
    // The process that will hold the grant: the caller, or a process it may bind.
    let target_owned;
    let target: &Requester = match req.pid {
        Some(pid) if pid != peer.pid => {
            target_owned = attest::attest_pid(pid)?;
            attest::may_bind(peer, &target_owned)?;
            &target_owned
        }
        _ => peer,
    };
    attest::selector_allows(&intent, target)?;
    let (ttl, clamped) = request::resolve_ttl(&intent, req.ttl);
    let sha = m.exe_sha256(target)?;
    let subject = target.subject(sha);
    // DNS and signing before the registry lock.
    let nets = resolve_destinations(&intent.destinations);
    let (signer, issuer) = {
        let reg = lock(&m.registry);
        (reg.signer.clone(), reg.issuer.clone())
    };
    let prepared = Registry::prepare(&signer, &issuer, &intent, subject, ttl, clamped)?;
    let (grant, _slot, recorded) = lock(&m.registry).issue(prepared, &intent, nets)?;
    // Kernel first, ledger second: a grant the ledger could not record is undone.
    let recorded = recorded.await.unwrap_or_else(|_| Err("the ledger writer has stopped".into()));
    if let Err(e) = recorded {
        lock(&m.registry).abort(&grant.id, false);
        return Err(MintError::internal(e).into());
    }
    // The pidfd still names the live process only if it did not exit meanwhile; if it did,
    // its pid may already belong to someone else, who must not inherit the grant.
    if target.is_gone() {
        lock(&m.registry).abort(&grant.id, true);
        return Err(MintError::SubjectGone(format!(
            "process {} exited before the grant was bound",
            target.pid
        ))
        .into());
    }
    let mut v = grant_json(&grant);
    if let Some(b) = broker {
        match b.register(&grant) {
            Ok(Some(env)) => {
                v["aws"] = json!({
                    "credentials_full_uri": env.credentials_full_uri,
                    "authorization_token_file": env.authorization_token_file,
                })
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(grant = %grant.id, "AWS token file: {e}"),
        }
    }
    Ok((StatusCode::CREATED, v))
}

/// GET /v1/grants[?state=active&intent=NAME&limit=N].
pub async fn list(m: &MintState, query: &str) -> Result<(StatusCode, Value), ApiError> {
    let mut filter = ListFilter { state: None, intent: None, limit: 1000 };
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "state" => {
                filter.state = Some(GrantState::parse(v).ok_or_else(|| {
                    ApiError::bad_request("invalid_query", format!("unknown state {v:?}"))
                })?)
            }
            "intent" => filter.intent = Some(v.to_string()),
            "limit" => {
                filter.limit =
                    v.parse().ok().filter(|n| *n > 0 && *n <= 10_000).ok_or_else(|| {
                        ApiError::bad_request("invalid_query", "limit must be 1..=10000")
                    })?
            }
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown query parameter {k:?}"),
                ));
            }
        }
    }
    m.ledger_tx.barrier().await;
    let grants = lock(&m.ledger).list(filter).map_err(|e| MintError::Internal(format!("{e:#}")))?;
    // Live state (in memory) is newer than the ledger only for grants changing right now.
    let reg = lock(&m.registry);
    let v: Vec<Value> = grants
        .iter()
        .map(|g| grant_json(&reg.live_grant(&g.id).unwrap_or_else(|| g.clone())))
        .collect();
    Ok((StatusCode::OK, json!({"grants": v})))
}

/// GET /v1/grants/{id}: the grant and its life from the ledger (issued, used, ended).
pub async fn get(m: &MintState, id: &str) -> Result<(StatusCode, Value), ApiError> {
    let g = m.grant(id).await?.ok_or_else(|| MintError::UnknownGrant(id.to_string()))?;
    let mut v = grant_json(&g);
    m.ledger_tx.barrier().await;
    let history: Vec<Value> = lock(&m.ledger)
        .events(id)
        .unwrap_or_default()
        .into_iter()
        .map(|e| json!({"time": crate::event::rfc3339(e.time), "kind": e.kind, "detail": e.detail}))
        .collect();
    v["history"] = json!(history);
    Ok((StatusCode::OK, v))
}

/// DELETE /v1/grants/{id}: root, or a process of the grant subject's uid.
pub async fn revoke(
    m: &MintState,
    peer: &Requester,
    id: &str,
) -> Result<(StatusCode, Value), ApiError> {
    let g = m.grant(id).await?.ok_or_else(|| MintError::UnknownGrant(id.to_string()))?;
    if peer.uid != 0 && peer.uid != g.subject.uid {
        return Err(MintError::NotYourGrant(format!(
            "grant {id} belongs to uid {}",
            g.subject.uid
        ))
        .into());
    }
    if g.state != GrantState::Active {
        return Err(MintError::NotActive { id: id.to_string(), state: g.state }.into());
    }
    let reason = format!("revoked by pid {} (uid {})", peer.pid, peer.uid);
    let revoked = lock(&m.registry).revoke(id, &reason);
    match revoked {
        Ok(g) => Ok((StatusCode::OK, grant_json(&g))),
        // Ended since it was looked up: say how.
        Err(MintError::UnknownGrant(_)) => {
            let state = m.grant(id).await?.map_or(GrantState::Ended, |g| g.state);
            Err(MintError::NotActive { id: id.to_string(), state }.into())
        }
        Err(e) => Err(e.into()),
    }
}
