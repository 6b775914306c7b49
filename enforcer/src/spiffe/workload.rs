//! The SPIFFE Workload API (`SpiffeWorkloadAPI`, proto/workload.proto) over HTTP/2 on the Unix
//! socket. Each connection's peer is attested by the kernel at accept (SO_PEERCRED + pidfd) and
//! handed to every request of that connection; what the caller sends never names it.
//!
//! JWT profile: FetchJWTSVID, FetchJWTBundles (stream: the bundle now and after each key
//! rotation), ValidateJWTSVID. X.509 profile: FetchX509SVID answers `Unimplemented`
//! (docs/threat-model.md, "Workload identity": this agent issues JWT-SVIDs only).
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixListener;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::authz::{self, Holdings};
use super::jwt;
use super::proto::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use super::proto::*;
use super::{Spiffe, SvidEvent};
use crate::decide::Verdict;
use crate::mint::attest::{self, Requester};

/// Concurrent Workload API connections; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 256;
/// Audiences per request, and bytes per audience: bounds on hostile input.
const MAX_AUDIENCES: usize = 32;
const MAX_AUDIENCE_BYTES: usize = 512;

/// The peer of the connection a request came in on.
#[derive(Clone)]
struct Peer(Arc<Requester>);

pub async fn serve(listener: UnixListener, sp: Arc<Spiffe>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let service = SpiffeWorkloadApiServer::new(Api { sp })
        .max_decoding_message_size(64 * 1024)
        .max_encoding_message_size(1024 * 1024);
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("spiffe.sock accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let peer = match attest::attest_peer(&stream) {
                Ok(p) => Peer(Arc::new(p)),
                Err(e) => {
                    tracing::warn!("spiffe.sock: peer not attested: {e}");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut().insert(peer.clone());
                let mut s = service.clone();
                async move { tonic::codegen::Service::call(&mut s, req).await }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!("spiffe.sock connection: {e}");
            }
        });
    }
}

struct Api {
    sp: Arc<Spiffe>,
}

/// The standard's security header: a request without it is refused with InvalidArgument, so a
/// browser or a confused HTTP client cannot be turned against the socket.
fn check_header<T>(req: &Request<T>) -> Result<Arc<Requester>, Status> {
    if req.metadata().get("workload.spiffe.io").is_none_or(|v| v.as_bytes() != b"true") {
        return Err(Status::invalid_argument("security header missing from request"));
    }
    req.extensions()
        .get::<Peer>()
        .map(|p| p.0.clone())
        .ok_or_else(|| Status::internal("request without an attested peer"))
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<JwtBundlesResponse, Status>> + Send>>;
type X509Stream = Pin<Box<dyn Stream<Item = Result<X509svidResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Api {
    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let peer = check_header(&req)?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.audience.len() > MAX_AUDIENCES
            || r.audience.iter().any(|a| a.is_empty() || a.len() > MAX_AUDIENCE_BYTES)
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_AUDIENCES} audiences of 1..={MAX_AUDIENCE_BYTES} bytes each"
            )));
        }
        let wanted_id = (!r.spiffe_id.is_empty()).then_some(r.spiffe_id.as_str());
        let sp = &self.sp;
        let holdings = authz::holdings(sp, &peer);
        let chosen = authz::choose(&holdings.entitled, &r.audience, wanted_id);
        if chosen.is_empty() {
            let (verdict, why) = refusal(&holdings, &r.audience, wanted_id, peer.pid);
            let grant = holdings
                .refused
                .iter()
                .find(|f| f.verdict == verdict)
                .map(|f| (f.grant_id.clone(), f.intent.clone(), f.expires_at))
                .or_else(|| {
                    holdings
                        .entitled
                        .first()
                        .map(|e| (e.grant_id.clone(), e.intent.clone(), e.expires_at))
                });
            let _ = sp.events.send(SvidEvent {
                pid: peer.pid,
                issued: false,
                verdict,
                grant,
                decision_path: vec!["spiffe: FetchJWTSVID".into(), why.clone()],
                message: format!("JWT-SVID refused to pid {}: {why}", peer.pid),
            });
            return Err(Status::permission_denied(why));
        }
        let keys = sp.keys();
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(sp.cfg.svid_ttl).unwrap_or(chrono::Duration::MAX);
        let mut svids = Vec::with_capacity(chosen.len());
        for e in chosen {
            let expires_at = e.expires_at.min(now + ttl);
            let (token, claims) = jwt::issue(
                &keys.current,
                &jwt::Issue {
                    spiffe_id: &e.spiffe_id,
                    audiences: &r.audience,
                    issuer: &sp.cfg.issuer,
                    grant_id: &e.grant_id,
                    intent: &e.intent,
                    now,
                    expires_at,
                },
            )
            .map_err(|err| Status::internal(format!("signing: {err:#}")))?;
            let _ = sp.events.send(SvidEvent {
                pid: peer.pid,
                issued: true,
                verdict: Verdict::Allowed,
                grant: Some((e.grant_id.clone(), e.intent.clone(), e.expires_at)),
                decision_path: vec![
                    "spiffe: FetchJWTSVID".into(),
                    format!("grant {} (intent {}) live, audiences allowed", e.grant_id, e.intent),
                ],
                message: format!(
                    "JWT-SVID {} issued to pid {} for audience(s) {} (jti {}, kid {}, exp {})",
                    e.spiffe_id,
                    peer.pid,
                    r.audience.join(","),
                    claims.jti,
                    keys.current.kid,
                    claims.exp
                ),
            });
            svids.push(Jwtsvid { spiffe_id: e.spiffe_id.clone(), svid: token });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    type FetchJWTBundlesStream = BundleStream;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        check_header(&req)?;
        let mut rx = self.sp.subscribe();
        let domain = self.sp.trust_domain_id();
        // The current bundle at once, then again after every rotation, until the client goes.
        let stream = async_stream(move |tx| async move {
            loop {
                let b = rx.borrow_and_update().clone();
                let msg = JwtBundlesResponse {
                    bundles: [(domain.clone(), b.bytes.clone())].into_iter().collect(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let keys = self.sp.keys();
        match jwt::validate(&keys, &self.sp.cfg.trust_domain, &r.svid, &r.audience, Utc::now()) {
            Ok((spiffe_id, claims)) => Ok(Response::new(ValidateJwtsvidResponse {
                spiffe_id,
                claims: Some(jwt::to_struct(&claims)),
            })),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }

    type FetchX509SVIDStream = X509Stream;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<X509Stream>, Status> {
        check_header(&req)?;
        Err(Status::unimplemented(
            "X.509-SVIDs are not issued by this agent: it issues JWT-SVIDs only (FetchJWTSVID)",
        ))
    }
}

/// Why nothing could be issued: the most telling reason among the caller's grants.
fn refusal(h: &Holdings, audiences: &[String], id: Option<&str>, pid: u32) -> (Verdict, String) {
    if h.entitled.is_empty() && !h.refused.is_empty() {
        // Every reason, and as verdict the one about the most current grant: one still live
        // but outside its intent, before expired, before revoked.
        let rank = |v: Verdict| match v {
            Verdict::OutOfIntent => 0,
            Verdict::Expired => 1,
            _ => 2,
        };
        let verdict = h.refused.iter().map(|f| f.verdict).min_by_key(|v| rank(*v));
        let why: Vec<&str> = h.refused.iter().map(|f| f.why.as_str()).collect();
        return (verdict.unwrap_or(Verdict::NoGrant), why.join("; "));
    }
    if h.entitled.is_empty() {
        return (Verdict::NoGrant, format!("process {pid} holds no live grant"));
    }
    let ids: Vec<&str> = h.entitled.iter().map(|e| e.spiffe_id.as_str()).collect();
    if let Some(id) = id.filter(|id| !ids.contains(id)) {
        return (
            Verdict::OutOfIntent,
            format!(
                "no grant held by process {pid} carries SPIFFE ID {id} (it may have: {})",
                ids.join(", ")
            ),
        );
    }
    let allowed: Vec<String> =
        h.entitled.iter().map(|e| format!("{}: {}", e.intent, e.audiences.join(","))).collect();
    (
        Verdict::OutOfIntent,
        format!(
            "audience(s) {} not allowed by the intent(s) of the grants held by process {pid} ({})",
            audiences.join(","),
            allowed.join("; ")
        ),
    )
}

/// A stream fed by a task: the task ends when the receiver is dropped (client gone).
fn async_stream<T, F, Fut>(f: F) -> Pin<Box<dyn Stream<Item = T> + Send>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
