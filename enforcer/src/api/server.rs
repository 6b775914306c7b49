//! Routes: GET /v1/health, GET /v1/status. Every error is JSON
//! `{"error": {"code", "message"}}`.
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::UnixListener;

/// What the API serves, kept current by the daemon.
pub struct ApiState {
    pub status: Mutex<Value>,
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
            let svc = service_fn(move |req| handle(req, state.clone()));
            // A slow or hostile client must not pin a task forever.
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
}

async fn handle(req: Request<Incoming>, state: Arc<ApiState>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    // Refuse oversized bodies up front, before any of it is read.
    let declared = req.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > super::MAX_BODY) {
        return Ok(error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", &format!("request bodies are limited to {} bytes", super::MAX_BODY)));
    }
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/health") => json_response(StatusCode::OK, json!({"status": "ok"})),
        (&Method::GET, "/v1/status") => {
            let v = state.status.lock().map(|s| s.clone()).unwrap_or(Value::Null);
            json_response(StatusCode::OK, v)
        }
        (_, "/v1/health" | "/v1/status") => error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET"),
        _ => error(StatusCode::NOT_FOUND, "not_found", &format!("no route {path}")),
    };
    Ok(resp)
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

pub fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(status, json!({"error": {"code": code, "message": message}}))
}
