//! Routes of the API socket. Every error is JSON `{"error": {"code", "message"}}`.
//! Each connection's peer is attested by the kernel at accept (SO_PEERCRED + pidfd); the
//! handlers never trust anything the caller says about itself.
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::UnixListener;

use super::error::ApiError;
use super::mint::{self, MintState};
use crate::mint::attest::{self, Requester};
use crate::mint::timing::Stamps;

/// What the API serves, kept current by the daemon.
pub struct ApiState {
    pub status: Mutex<Value>,
    pub mint: Arc<MintState>,
    /// Open, refused and idle-closed connections.
    pub conns: Arc<super::conn::ConnStats>,
    /// Asks the daemon loop to reload the policy; answers with the outcome.
    pub reload: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Result<String, String>>>,
    pub sink_metrics: crate::alert::SinkMetrics,
    /// Brokered AWS credentials and daemon-held secrets.
    pub delivery: super::credentials::Delivery,
    /// Workload identity, when `[spiffe]` is configured: OIDC discovery is served here too.
    pub spiffe: Option<Arc<crate::spiffe::Spiffe>>,
}

/// Worker threads of the API's own runtime.
const API_THREADS: usize = 2;

/// Tasks a worker runs between two polls of the socket readiness (tokio's default is 61).
/// A busy worker runs request after request (each tens of µs) from its own queue: at 61 a
/// request that became readable meanwhile waited for up to 61 of them, milliseconds at
/// 5,000 grants/s. At 2 a worker looks for newly readable connections after every other
/// task, for one epoll_wait each time. `cargo xtask bench --only mint`, single rounds
/// interleaved with ENFORCER_API_EVENT_INTERVAL=61 on a quiet host: client-observed p99
/// 1.42-2.67 ms (median 1.74 of 7) against 2.03-3.18 ms (median 2.89 of 5); at 1 the polls
/// cost more than they save (2.34, 3.18 ms).
const API_EVENT_INTERVAL: u32 = 2;

/// The API server on a runtime of its own. The daemon's event loop runs long synchronous
/// stretches (ring drains, event writes, the status document) on the main runtime's two
/// workers; a request queued behind one waited for all of it (grant issuance p99 of tens of
/// milliseconds at 5,000/s). The kernel preempts threads; tokio does not preempt tasks.
pub struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    /// Stops accepting and drops every connection (the thread ends on its own).
    pub fn abort(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The number of workers: API_THREADS, or ENFORCER_API_THREADS (1-8; measurements).
fn api_threads() -> usize {
    env_in(std::env::var("ENFORCER_API_THREADS"), 1..=8).unwrap_or(API_THREADS)
}

/// API_EVENT_INTERVAL, or ENFORCER_API_EVENT_INTERVAL (1-255; measurements).
fn api_event_interval() -> u32 {
    env_in(std::env::var("ENFORCER_API_EVENT_INTERVAL"), 1..=255).unwrap_or(API_EVENT_INTERVAL)
}

/// A measurement override read from the environment, if it parses and lies in `range`.
fn env_in<T: std::str::FromStr + PartialOrd>(
    var: Result<String, std::env::VarError>,
    range: std::ops::RangeInclusive<T>,
) -> Option<T> {
    var.ok().and_then(|v| v.parse().ok()).filter(|n| range.contains(n))
}

/// The workers' time slice: `mint::sched::API_SLICE_NS`, or ENFORCER_API_SLICE_US
/// (measurements; 0: the kernel's default).
fn api_slice_ns() -> u64 {
    std::env::var("ENFORCER_API_SLICE_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(crate::mint::sched::API_SLICE_NS, |us| us * 1000)
}

/// The workers' nice value: `mint::sched::API_NICE`, or ENFORCER_API_NICE (measurements).
fn api_nice() -> i32 {
    std::env::var("ENFORCER_API_NICE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(crate::mint::sched::API_NICE)
}

pub fn serve_on_own_runtime(
    listener: UnixListener,
    state: Arc<ApiState>,
) -> std::io::Result<Server> {
    let listener = listener.into_std()?;
    // The workers are the runtime's first `workers` threads (tokio starts them when the
    // runtime is built); later ones are its blocking pool (hashing a new executable), which
    // keeps the normal priority.
    let started = std::sync::atomic::AtomicUsize::new(0);
    let workers = api_threads();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name_fn(move || {
            let n = started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n < workers { "api".into() } else { "api-blocking".into() }
        })
        .on_thread_start(|| {
            if std::thread::current().name() == Some("api") {
                crate::mint::sched::set_thread_nice_and_slice(api_nice(), api_slice_ns());
            }
        })
        .event_interval(api_event_interval())
        .enable_all()
        .build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new().name("api-accept".into()).spawn(move || {
        rt.block_on(async move {
            let listener = match UnixListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("mint.sock: cannot serve: {e}");
                    return;
                }
            };
            tokio::select! {
                _ = serve(listener, state) => {}
                _ = stopped => {}
            }
        });
        // Connection tasks are dropped, not waited for.
        rt.shutdown_background();
    })?;
    Ok(Server { stop: Some(stop) })
}

pub async fn serve(listener: UnixListener, state: Arc<ApiState>) {
    use super::conn::{self, Activity, InFlight, Slot, Tracked};
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                tracing::warn!("mint.sock accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let limits = state.mint.config.lock().map(|c| c.limits.clone()).unwrap_or_default();
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        let (max, per_uid) =
            (limits.api_max_connections as u64, limits.api_max_connections_per_uid as u64);
        let Some(slot) = Slot::take(&state.conns, max, uid, per_uid) else {
            conn::refuse(stream);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // Who is calling, from the kernel; a peer that cannot be attested gets nothing.
            let peer = match attest::attest_peer(&stream) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::warn!("mint.sock: peer not attested: {e}");
                    let cred = stream.peer_cred().ok();
                    refused(
                        &state,
                        cred.and_then(|c| c.pid()).unwrap_or(0).max(0) as u32,
                        cred.map_or(u32::MAX, |c| c.uid()),
                        None,
                        &ApiError::from(e),
                    );
                    return;
                }
            };
            let stats = state.conns.clone();
            let activity = Arc::new(Activity::default());
            let epoch = std::time::Instant::now();
            let idle = std::time::Duration::from_secs(limits.api_idle_timeout_seconds as u64);
            // A pidfd the client sent with its request names the process it binds.
            let sent = Arc::new(
                conn::peek_pidfd(&stream, idle.min(std::time::Duration::from_secs(5))).await,
            );
            let svc = {
                let activity = activity.clone();
                service_fn(move |req| {
                    let mut stamps = Stamps::new();
                    if stamps.on() {
                        let read = activity.last_read_ns.load(std::sync::atomic::Ordering::Relaxed);
                        let wrote =
                            activity.last_write_ns.load(std::sync::atomic::Ordering::Relaxed);
                        // The previous answer's last write on this connection, then this
                        // request's last read.
                        stamps.mark_at("prev_write", wrote);
                        stamps.mark_at("read", read);
                        stamps.mark("handler");
                    }
                    let busy = InFlight::new(&activity);
                    let (state, peer, sent) = (state.clone(), peer.clone(), sent.clone());
                    async move {
                        let r = handle(req, state, peer, sent, stamps).await;
                        drop(busy);
                        r
                    }
                })
            };
            // A slow or hostile client must not pin a task (and two fds) forever.
            let io = Tracked { inner: stream, activity: activity.clone(), epoch };
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(io), svc);
            conn::drive(conn, activity, epoch, idle, &stats).await;
        });
    }
}

/// Records a refused grant request (or failed attestation) as an event, through the engine.
fn refused(state: &ApiState, pid: u32, uid: u32, intent: Option<String>, e: &ApiError) {
    let r =
        mint::Refusal { pid, uid, code: e.code.to_string(), message: e.message.clone(), intent };
    if state.mint.refusals.try_send(r).is_err() {
        state.mint.refusals_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<ApiState>,
    peer: Arc<Requester>,
    sent: Arc<Option<std::os::fd::OwnedFd>>,
    mut stamps: Stamps,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return Ok(api_error(&e)),
    };
    stamps.mark("body");
    let result: Result<(StatusCode, Value), ApiError> = match route(&method, &path) {
        Route::Health => Ok((StatusCode::OK, json!({"status": "ok"}))),
        Route::Status => {
            let mut st = state.status.lock().map(|s| s.clone()).unwrap_or(Value::Null);
            if let Some(o) = st.as_object_mut() {
                let mut api = state.conns.json();
                api["refusals_dropped"] =
                    json!(state.mint.refusals_dropped.load(std::sync::atomic::Ordering::Relaxed));
                o.insert("api".into(), api);
            }
            Ok((StatusCode::OK, st))
        }
        Route::Keys => Ok((StatusCode::OK, state.mint.jwks())),
        Route::Metrics => return Ok(metrics(&state)),
        Route::Issue => {
            let r = mint::issue(state.mint.clone(), peer.clone(), body.clone(), sent, &mut stamps)
                .await;
            if let Err(e) = &r
                && matches!(e.status, 403 | 404 | 409 | 429 | 503)
            {
                let intent = crate::mint::request::parse(&body).ok().map(|r| r.intent);
                refused(&state, peer.pid, peer.uid, intent, e);
            }
            r
        }
        Route::List => mint::list(&state.mint, &peer, &query).await,
        Route::Get(id) => mint::get(&state.mint, &peer, &id).await,
        Route::Revoke(id) => mint::revoke(&state.mint, &peer, &id).await,
        Route::Reload => reload(&state, &peer).await,
        Route::AwsCredentials => {
            super::credentials::credential_process(&state, &peer, &query).await
        }
        Route::Secret(name) => super::credentials::secret(&state, &peer, &name).await,
        Route::Oidc => match &state.spiffe {
            Some(sp) => {
                Ok((StatusCode::OK, crate::spiffe::oidc::route(sp, &path).unwrap_or_default()))
            }
            None => Err(ApiError::not_found(
                "spiffe_disabled",
                "workload identity is not configured ([spiffe] trust_domain)",
            )),
        },
        Route::Refused(e) => Err(e),
    };
    let mut resp = match result {
        Ok((status, v)) => json_response(status, v),
        Err(e) => api_error(&e),
    };
    stamps.mark("respond");
    if let Some(h) = stamps.header().and_then(|h| hyper::header::HeaderValue::from_str(&h).ok()) {
        resp.headers_mut().insert(crate::mint::timing::HEADER, h);
    }
    Ok(resp)
}

/// What a request asks for, from its method and path alone.
#[derive(Debug, PartialEq)]
pub enum Route {
    Health,
    Status,
    Keys,
    Metrics,
    Issue,
    List,
    Get(String),
    Revoke(String),
    Reload,
    /// GET /v1/credentials/aws (credential_process).
    AwsCredentials,
    /// GET /v1/secrets/{name}.
    Secret(String),
    /// OIDC discovery (`/.well-known/openid-configuration`, `/keys`) of the SPIFFE issuer.
    Oidc,
    /// 404 (no such route) or 405 (method not allowed).
    Refused(ApiError),
}

pub fn route(method: &Method, path: &str) -> Route {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["", "v1", "health"]) => Route::Health,
        (&Method::GET, ["", "v1", "status"]) => Route::Status,
        (&Method::GET, ["", "v1", "keys"]) => Route::Keys,
        (&Method::GET, ["", "v1", "metrics"] | ["", "metrics"]) => Route::Metrics,
        (&Method::POST, ["", "v1", "grants"]) => Route::Issue,
        (&Method::GET, ["", "v1", "grants"]) => Route::List,
        (&Method::GET, ["", "v1", "grants", id]) => Route::Get(id.to_string()),
        (&Method::DELETE, ["", "v1", "grants", id]) => Route::Revoke(id.to_string()),
        (&Method::POST, ["", "v1", "policy", "reload"]) => Route::Reload,
        (&Method::GET, ["", "v1", "credentials", "aws"]) => Route::AwsCredentials,
        (&Method::GET, ["", "v1", "secrets", name]) => Route::Secret(name.to_string()),
        (&Method::GET, ["", ".well-known", "openid-configuration"] | ["", "keys"]) => Route::Oidc,
        (
            _,
            ["", "v1", "health" | "status" | "keys" | "grants" | "metrics"]
            | ["", "v1", "grants", _]
            | ["", "v1", "policy", "reload"]
            | ["", "v1", "credentials", "aws"]
            | ["", "v1", "secrets", _],
        ) => Route::Refused(ApiError::new(
            405,
            "method_not_allowed",
            format!("{method} not allowed on {path}"),
        )),
        _ => Route::Refused(ApiError::not_found("not_found", format!("no route {path}"))),
    }
}

/// What the API answers to `req` up to the point where state is needed: routing, the body
/// limit, body and query parsing. The fuzz target `api_http` drives real HTTP/1.1 bytes
/// through hyper into this; requests that pass every check are answered `200 {"ok": ...}`.
pub async fn answer_stateless(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return Ok(api_error(&e)),
    };
    let r = match route(&method, &path) {
        Route::Refused(e) => Err(e),
        Route::Issue => crate::mint::request::parse(&body).map(|_| ()).map_err(ApiError::from),
        Route::List => mint::parse_list_query(&query).map(|_| ()),
        _ => Ok(()),
    };
    Ok(match r {
        Ok(()) => json_response(StatusCode::OK, json!({"ok": path})),
        Err(e) => api_error(&e),
    })
}

/// POST /v1/policy/reload (root only): the same as SIGHUP, but the caller learns the outcome.
async fn reload(state: &ApiState, peer: &Requester) -> Result<(StatusCode, Value), ApiError> {
    if peer.uid != 0 {
        return Err(ApiError::forbidden("not_root", "only root may reload the policy"));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    state
        .reload
        .send(tx)
        .await
        .map_err(|_| ApiError::new(503, "shutting_down", "the daemon is stopping"))?;
    match rx.await {
        Ok(Ok(source)) => Ok((StatusCode::OK, json!({"reloaded": source}))),
        Ok(Err(msg)) => Err(ApiError::new(
            422,
            "invalid_policy",
            format!("reload refused, current policy kept:\n{msg}"),
        )),
        Err(_) => Err(ApiError::new(503, "shutting_down", "the daemon is stopping")),
    }
}

/// Prometheus text: daemon counters from the status document, plus sink delivery.
fn metrics(state: &ApiState) -> Response<Full<Bytes>> {
    let st = state.status.lock().map(|s| s.clone()).unwrap_or(Value::Null);
    let n = |p: &str| st.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, v: u64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
    };
    metric(
        "enforcer_events_total",
        "Events written to the event store.",
        "counter",
        n("/events_total"),
    );
    metric(
        "enforcer_alerts_total",
        "Events whose verdict is not allowed.",
        "counter",
        n("/alerts_total"),
    );
    metric(
        "enforcer_kernel_ringbuf_drops_total",
        "Kernel records lost because the ring buffer was full.",
        "counter",
        n("/kernel/ringbuf_drops"),
    );
    metric("enforcer_live_grants", "Active grants.", "gauge", n("/live_grants"));
    metric(
        "enforcer_decision_mismatches_total",
        "Connects where the kernel and decide.rs disagreed.",
        "counter",
        n("/counts/decision_mismatches"),
    );
    out.push_str(&state.sink_metrics.metrics_text());
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(out)))
        .expect("static response parts")
}

/// Reads at most MAX_BODY bytes; a larger body is refused (413). The rest of an oversized
/// body is read and dropped (at most `DRAIN_MAX` bytes, for at most `DRAIN_TIME`) before the
/// answer: a server that closes with unread data makes the kernel reset the connection, and a
/// client still sending then gets EPIPE/ECONNRESET instead of the 413 (seen as a flaky test on
/// a loaded host). Past those bounds the connection is cut, as before.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::too_large(
            "body_too_large",
            format!("request bodies are limited to {} bytes", super::MAX_BODY),
        )
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let mut body = req.into_body();
    if declared.is_some_and(|n| n > super::MAX_BODY) {
        drain(body, 0).await;
        return Err(too_large());
    }
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request("bad_body", format!("reading the request body: {e}"))
        })?;
        let Ok(data) = frame.into_data() else { continue };
        if buf.len() + data.len() > super::MAX_BODY {
            drain(body, buf.len() + data.len()).await;
            return Err(too_large());
        }
        buf.extend_from_slice(&data);
    }
    Ok(Bytes::from(buf))
}

/// Most bytes of an oversized request body read (and dropped) so its sender gets the 413.
const DRAIN_MAX: usize = 1 << 20;
/// Longest the drain waits for them.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops the rest of `body` (`seen` bytes already read), within the bounds above.
async fn drain(mut body: Incoming, mut seen: usize) {
    let rest = async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DRAIN_MAX {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, rest).await;
}

pub fn json_response(status: StatusCode, v: Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec(&v).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

fn api_error(e: &ApiError) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_response(status, e.to_json());
    if status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut().insert("retry-after", hyper::header::HeaderValue::from_static("1"));
    }
    r
}
