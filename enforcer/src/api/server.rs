//! Routes of the API socket. Every error is JSON `{"error": {"code", "message"}}`.
//! Each connection's peer is attested by the kernel at accept (SO_PEERCRED + pidfd); the
//! handlers never trust anything the caller says about itself.
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::UnixListener;

use super::error::ApiError;
use super::mint::{self, MintState};
use crate::mint::attest::{self, Requester};

/// What the API serves, kept current by the daemon.
pub struct ApiState {
    pub status: Mutex<Value>,
    pub mint: MintState,
    /// Asks the daemon loop to reload the policy; answers with the outcome.
    pub reload: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Result<String, String>>>,
    pub sink_metrics: crate::alert::SinkMetrics,
    /// Brokered AWS credentials and daemon-held secrets.
    pub delivery: super::credentials::Delivery,
    /// Workload identity, when `[spiffe]` is configured: OIDC discovery is served here too.
    pub spiffe: Option<Arc<crate::spiffe::Spiffe>>,
}

pub async fn serve(listener: UnixListener, state: Arc<ApiState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("mint.sock accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            // Who is calling, from the kernel; a peer that cannot be attested gets nothing.
            let peer = match attest::attest_peer(&stream) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::warn!("mint.sock: peer not attested: {e}");
                    return;
                }
            };
            let svc = service_fn(move |req| handle(req, state.clone(), peer.clone()));
            // A slow or hostile client must not pin a task forever.
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<ApiState>,
    peer: Arc<Requester>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return Ok(api_error(&e)),
    };
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let result: Result<(StatusCode, Value), ApiError> = match (&method, segments.as_slice()) {
        (&Method::GET, ["", "v1", "health"]) => Ok((StatusCode::OK, json!({"status": "ok"}))),
        (&Method::GET, ["", "v1", "status"]) => {
            Ok((StatusCode::OK, state.status.lock().map(|s| s.clone()).unwrap_or(Value::Null)))
        }
        (&Method::GET, ["", "v1", "keys"]) => Ok((StatusCode::OK, state.mint.jwks())),
        (&Method::GET, ["", "v1", "metrics"] | ["", "metrics"]) => return Ok(metrics(&state)),
        (&Method::POST, ["", "v1", "grants"]) => mint::issue(&state.mint, &peer, &body).await,
        (&Method::GET, ["", "v1", "grants"]) => mint::list(&state.mint, &query).await,
        (&Method::GET, ["", "v1", "grants", id]) => mint::get(&state.mint, id).await,
        (&Method::DELETE, ["", "v1", "grants", id]) => mint::revoke(&state.mint, &peer, id).await,
        (&Method::POST, ["", "v1", "policy", "reload"]) => reload(&state, &peer).await,
        (&Method::GET, ["", "v1", "credentials", "aws"]) => {
            super::credentials::credential_process(&state, &peer, &query).await
        }
        (&Method::GET, ["", "v1", "secrets", name]) => {
            super::credentials::secret(&state, &peer, name).await
        }
        (&Method::GET, ["", ".well-known", "openid-configuration"] | ["", "keys"]) => {
            match &state.spiffe {
                Some(sp) => {
                    Ok((StatusCode::OK, crate::spiffe::oidc::route(sp, &path).unwrap_or_default()))
                }
                None => Err(ApiError::not_found(
                    "spiffe_disabled",
                    "workload identity is not configured ([spiffe] trust_domain)",
                )),
            }
        }
        (
            _,
            ["", "v1", "health" | "status" | "keys" | "grants" | "metrics"]
            | ["", "v1", "grants", _]
            | ["", "v1", "policy", "reload"]
            | ["", "v1", "credentials", "aws"]
            | ["", "v1", "secrets", _],
        ) => {
            Err(ApiError::new(405, "method_not_allowed", format!("{method} not allowed on {path}")))
        }
        _ => Err(ApiError::not_found("not_found", format!("no route {path}"))),
    };
    Ok(match result {
        Ok((status, v)) => json_response(status, v),
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

/// Reads at most MAX_BODY bytes; a larger body is refused (413) without reading on.
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
    if declared.is_some_and(|n| n > super::MAX_BODY) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), super::MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request("bad_body", format!("reading the request body: {e}"))),
    }
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
