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
use crate::mint::timing::Stamps;
use crate::mint::writer::LedgerTx;
use crate::policy::Config;

use crate::mint::procdir::ExeKey;

/// Issues hashing an executable (on the blocking pool) at once; more wait (up to ISSUE_WAIT).
const ISSUING_AT_ONCE: usize = 8;
/// Longest a request waits for its blocking work (hashing an executable not hashed before).
const ISSUE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A refused grant request or a failed attestation: recorded as a `mint_refused` event.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub pid: u32,
    pub uid: u32,
    pub code: String,
    pub message: String,
    pub intent: Option<String>,
}

pub struct MintState {
    pub registry: Arc<Mutex<Registry>>,
    /// For reads (list, get, history); the writer thread shares it.
    ledger: Arc<Mutex<Ledger>>,
    ledger_tx: LedgerTx,
    /// The policy in force; replaced atomically on reload.
    pub config: Mutex<Arc<Config>>,
    /// Grant requests per uid (a fork per request gets no fresh bucket).
    pub limiter: Mutex<RateLimiter<u32>>,
    /// Refused grant requests and failed attestations, for the engine to record as events.
    pub refusals: tokio::sync::mpsc::Sender<Refusal>,
    /// Refusals not recorded because the engine's queue was full.
    pub refusals_dropped: std::sync::atomic::AtomicU64,
    /// Issues hashing an executable not hashed before, each on the blocking pool (the rest
    /// of an issue runs on the API runtime's own workers).
    issuing: tokio::sync::Semaphore,
    /// exe sha256 by (dev, ino, size, mtime): hashing a large binary on every request
    /// would cost milliseconds.
    exe_hashes: Mutex<HashMap<ExeKey, String>>,
    jwks: Value,
    /// The registry's token signer and issuer (fixed for the daemon's life), so signing
    /// takes no registry lock.
    signer: Arc<crate::mint::token::Signer>,
    issuer: String,
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
        limiter: RateLimiter<u32>,
        refusals: tokio::sync::mpsc::Sender<Refusal>,
    ) -> Self {
        let (jwks, signer, issuer) = {
            let reg = lock(&registry);
            (reg.signer.jwks(), reg.signer.clone(), reg.issuer.clone())
        };
        MintState {
            registry,
            ledger,
            ledger_tx,
            config: Mutex::new(config),
            limiter: Mutex::new(limiter),
            refusals,
            refusals_dropped: Default::default(),
            issuing: tokio::sync::Semaphore::new(ISSUING_AT_ONCE),
            exe_hashes: Mutex::new(HashMap::new()),
            jwks,
            signer,
            issuer,
            aws: Default::default(),
        }
    }

    pub fn jwks(&self) -> Value {
        self.jwks.clone()
    }

    /// The exe hash of `r` if it is cached (None: hashing is needed, which may be slow).
    fn cached_exe_sha256(&self, r: &Requester) -> Result<(ExeKey, Option<String>), MintError> {
        let gone =
            || MintError::SubjectGone(format!("process {} exited during attestation", r.pid));
        let key = match r.exe_key {
            Some(k) => k,
            None => {
                let md = std::fs::metadata(format!("/proc/{}/exe", r.pid)).map_err(|_| gone())?;
                (md.dev(), md.ino(), md.size(), md.mtime_nsec() + md.mtime() * 1_000_000_000)
            }
        };
        let cached = lock(&self.exe_hashes).get(&key).cloned();
        Ok((key, cached))
    }

    /// The exe hash of `r`, hashing (blocking; from the blocking pool) if not cached.
    fn exe_sha256(&self, r: &Requester) -> Result<String, MintError> {
        let gone =
            || MintError::SubjectGone(format!("process {} exited during attestation", r.pid));
        let (key, cached) = self.cached_exe_sha256(r)?;
        if let Some(h) = cached {
            return Ok(h);
        }
        let h = match r.exe_sha256() {
            Ok(h) => h,
            // Too large to hash (limits.exe_hash_max_bytes): the subject's hash stays empty
            // and no exe_sha256 selector can match it.
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => return Ok(String::new()),
            Err(_) => return Err(gone()),
        };
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

/// POST /v1/grants. Hashing an executable seen for the first time runs on the blocking pool
/// (at most ISSUING_AT_ONCE at once, each waited for at most ISSUE_WAIT); the registry and
/// the ledger outcome after it.
pub async fn issue(
    m: Arc<MintState>,
    peer: Arc<Requester>,
    body: bytes::Bytes,
    sent: Arc<Option<std::os::fd::OwnedFd>>,
    stamps: &mut Stamps,
) -> Result<(StatusCode, Value), ApiError> {
    if let Err(retry) = lock(&m.limiter).check(peer.uid, Instant::now()) {
        return Err(MintError::RateLimited { uid: peer.uid, retry }.into());
    }
    let req = request::parse(&body)?;
    stamps.mark("parse");
    // Attestation reads /proc (in memory: tens of microseconds) and signing takes tens of
    // microseconds: both run here, on the API's own runtime (`serve_on_own_runtime`), with no
    // hop to the blocking pool and back. Only hashing an executable not hashed before can
    // take long; that request is prepared again on the blocking pool.
    let prepared = match prepare(&m, &peer, &req, &sent, false, stamps)? {
        Some(p) => p,
        None => {
            let busy = || ApiError::new(503, "mint_busy", "the mint is busy; retry later");
            let _permit = tokio::time::timeout(ISSUE_WAIT, m.issuing.acquire())
                .await
                .map_err(|_| busy())?
                .map_err(|_| busy())?;
            stamps.mark("hash_permit");
            let (m2, p2) = (m.clone(), peer.clone());
            let mut on_pool = Stamps::new();
            let (prepared, on_pool) = tokio::time::timeout(
                ISSUE_WAIT,
                tokio::task::spawn_blocking(move || {
                    (prepare(&m2, &p2, &req, &sent, true, &mut on_pool), on_pool)
                }),
            )
            .await
            .map_err(|_| busy())?
            .map_err(|e| ApiError::from(MintError::internal(format!("issue task: {e}"))))?;
            stamps.extend(&on_pool);
            prepared?.ok_or_else(|| MintError::internal("exe hash unavailable after hashing"))?
        }
    };
    let Prepared { grant, intent, nets, target, config } = prepared;
    let limits = &config.limits;
    let (grant, _slot) = {
        let mut reg = lock(&m.registry);
        stamps.mark("lock");
        // Quotas are checked and taken under one lock: concurrent requests cannot overshoot.
        let subject = &grant.subject;
        let (by_uid, by_cgroup) = reg.held_by(subject.uid, &subject.cgroup);
        if subject.uid != 0 {
            let uid = subject.uid.to_string();
            quota("uid", &uid, by_uid, limits.mint_grants_per_uid, "mint_grants_per_uid")?;
            let cg = &subject.cgroup;
            quota(
                "cgroup",
                cg,
                by_cgroup,
                limits.mint_grants_per_cgroup,
                "mint_grants_per_cgroup",
            )?;
        }
        reg.issue(grant, &intent, nets, stamps)?
    };
    stamps.mark("unlock");
    // Kernel first, ledger second (in `issue`: a grant the ledger journal could not record
    // was undone there); the record is durable from here, SQLite gets it with the writer's
    // next group.
    // The pidfd still names the live process only if it did not exit meanwhile; if it did,
    // its pid may already belong to someone else, who must not inherit the grant.
    let target: &Requester = target.as_ref().unwrap_or(&peer);
    if target.is_gone() {
        lock(&m.registry).abort(&grant.id);
        return Err(MintError::SubjectGone(format!(
            "process {} exited before the grant was bound",
            target.pid
        ))
        .into());
    }
    stamps.mark("alive");
    let mut v = grant_json(&grant);
    stamps.mark("json");
    if let Some(b) = m.aws.get().filter(|_| intent.aws.is_some()).cloned() {
        // The token file is written on the blocking pool, not on an async worker.
        let g = grant.clone();
        let registered = tokio::task::spawn_blocking(move || b.register(&g))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match registered {
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

/// A signed grant ready to be made live.
struct Prepared {
    grant: Grant,
    intent: crate::policy::Intent,
    nets: crate::mint::view::Nets,
    /// The process named by `pid`, if not the caller.
    target: Option<Requester>,
    /// The policy the request was prepared under (its limits apply to it).
    config: Arc<Config>,
}

/// An issue up to the registry: attestation (/proc reads), the exe hash, signing. None if
/// the target's executable is not hashed yet and `may_hash` is false (hashing a large binary
/// takes milliseconds: the caller runs this again on the blocking pool with `may_hash`).
fn prepare(
    m: &MintState,
    peer: &Requester,
    req: &request::GrantRequest,
    sent: &Option<std::os::fd::OwnedFd>,
    may_hash: bool,
    stamps: &mut Stamps,
) -> Result<Option<Prepared>, MintError> {
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
    let target_owned = match req.pid {
        Some(pid) if pid != peer.pid && sent.is_some() => {
            // The pidfd the requester took when it named the target: exactly that process.
            let fd = sent.as_ref().and_then(|f| f.try_clone().ok()).ok_or_else(|| {
                MintError::AttestationFailed("cannot duplicate the pidfd sent".into())
            })?;
            let t = attest::attest_sent_pidfd(pid, fd)?;
            if let Some(ticks) = req.pid_start_time {
                attest::check_start_time(&t, ticks)?;
            }
            attest::may_bind(peer, &t)?;
            Some(t)
        }
        Some(pid) if pid != peer.pid => {
            let t = attest::attest_pid(pid).map_err(|e| match (e, req.pid_start_time) {
                // The pinned target is gone; whatever has its pid now is not it.
                (MintError::NoSuchProcess(_), Some(ticks)) => MintError::SubjectGone(format!(
                    "process {pid} named by the request (start time {ticks} ticks) exited"
                )),
                (e, _) => e,
            })?;
            if let Some(ticks) = req.pid_start_time {
                attest::check_start_time(&t, ticks)?;
            }
            attest::may_bind(peer, &t)?;
            Some(t)
        }
        _ => None,
    };
    let target: &Requester = target_owned.as_ref().unwrap_or(peer);
    if let (Some(ticks), None) = (req.pid_start_time, &target_owned) {
        attest::check_start_time(target, ticks)?;
    }
    stamps.mark("attest");
    let sha = if may_hash {
        m.exe_sha256(target)?
    } else {
        match m.cached_exe_sha256(target)? {
            (_, Some(h)) => h,
            (_, None) => return Ok(None),
        }
    };
    // Empty: too large to hash; no exe_sha256 selector matches it.
    attest::selector_allows_with(&intent, target, || Some(sha.clone()).filter(|h| !h.is_empty()))?;
    let (ttl, clamped) = request::resolve_ttl(&intent, req.ttl);
    let subject = target.subject(sha);
    let nets = resolve_destinations(&intent.destinations);
    stamps.mark("select");
    let grant = Registry::prepare(&m.signer, &m.issuer, &intent, subject, ttl, clamped)?;
    stamps.mark("sign");
    Ok(Some(Prepared { grant, intent, nets, target: target_owned, config }))
}

/// Whether `peer` may read `g`'s token: root, or a process of the subject's uid inside the
/// subject's subtree (the subject itself or one of its descendants).
fn may_see_token(peer: &Requester, g: &Grant) -> bool {
    peer.uid == 0
        || (peer.uid == g.subject.uid
            && attest::is_descendant(g.subject.pid, g.subject.start_ns, peer.pid)
            && !peer.is_gone())
}

/// A grant as `peer` may see it: without its token unless `may_see_token`.
fn grant_json_for(peer: &Requester, g: &Grant) -> Value {
    let mut v = grant_json(g);
    if !may_see_token(peer, g)
        && let Some(o) = v.as_object_mut()
    {
        o.remove("token");
    }
    v
}

/// GET /v1/grants[?state=active&intent=NAME&limit=N].
pub async fn list(
    m: &MintState,
    peer: &Requester,
    query: &str,
) -> Result<(StatusCode, Value), ApiError> {
    let filter = parse_list_query(query)?;
    m.ledger_tx.barrier().await;
    let grants = lock(&m.ledger).list(filter).map_err(|e| MintError::Internal(format!("{e:#}")))?;
    // Live state (in memory) is newer than the ledger only for grants changing right now.
    let reg = lock(&m.registry);
    let v: Vec<Value> = grants
        .iter()
        .map(|g| grant_json_for(peer, &reg.live_grant(&g.id).unwrap_or_else(|| g.clone())))
        .collect();
    Ok((StatusCode::OK, json!({"grants": v})))
}

/// The query of GET /v1/grants: `state`, `intent`, `limit`; anything else is refused.
pub fn parse_list_query(query: &str) -> Result<ListFilter, ApiError> {
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
    Ok(filter)
}

/// GET /v1/grants/{id}: the grant and its life from the ledger (issued, used, ended).
pub async fn get(
    m: &MintState,
    peer: &Requester,
    id: &str,
) -> Result<(StatusCode, Value), ApiError> {
    let g = m.grant(id).await?.ok_or_else(|| MintError::UnknownGrant(id.to_string()))?;
    let mut v = grant_json_for(peer, &g);
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
        Ok(g) => Ok((StatusCode::OK, grant_json_for(peer, &g))),
        // Ended since it was looked up: say how.
        Err(MintError::UnknownGrant(_)) => {
            let state = m.grant(id).await?.map_or(GrantState::Ended, |g| g.state);
            Err(MintError::NotActive { id: id.to_string(), state }.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// A per-uid or per-cgroup grant quota (0 = no limit), checked before one more is issued.
fn quota(what: &str, who: &str, held: usize, limit: u32, key: &str) -> Result<(), MintError> {
    if limit != 0 && held >= limit as usize {
        return Err(MintError::QuotaExceeded(format!(
            "{what} {who} already holds {held} live grants (limits.{key} = {limit})"
        )));
    }
    Ok(())
}
