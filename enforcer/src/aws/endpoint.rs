//! The AWS container-credentials endpoint on loopback (what the SDKs read from
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI`, sending the content of
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` as `Authorization`). The token only says which
//! grant is meant: the kernel says who is asking. At accept, the client socket's owners are
//! found (`peer`) and attested by pidfd; each must hold the token's grant live.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use super::CredentialNotice;
use crate::api::credentials::{AwsAsk, aws_credentials};
use crate::api::server::{ApiState, json_response};
use crate::mint::attest::{self, Requester};

/// Binds the endpoint (once; later calls do nothing) and serves it.
pub fn start(state: &Arc<ApiState>) -> anyhow::Result<()> {
    let broker = &state.delivery.broker;
    if broker.port() != 0 {
        return Ok(());
    }
    let std_listener = std::net::TcpListener::bind(broker.listen_addr()).map_err(|e| {
        anyhow::anyhow!("bind the AWS credentials endpoint {}: {e}", broker.listen_addr())
    })?;
    std_listener.set_nonblocking(true)?;
    let port = std_listener.local_addr()?.port();
    let listener = TcpListener::from_std(std_listener)?;
    broker.set_port(port);
    tracing::info!(port, "AWS container-credentials endpoint on loopback");
    tokio::spawn(serve(listener, state.clone()));
    Ok(())
}

async fn serve(listener: TcpListener, state: Arc<ApiState>) {
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("AWS endpoint accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(server) = stream.local_addr() else { return };
            let _ = stream.set_nodelay(true);
            // The /proc walk is blocking work: off the runtime's workers.
            let callers = tokio::task::spawn_blocking(move || callers(server, client))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            let callers = Arc::new(callers);
            let svc = service_fn(move |req| handle(req, state.clone(), callers.clone()));
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

/// The attested processes at the client end (every owner of the client socket).
fn callers(
    server: std::net::SocketAddr,
    client: std::net::SocketAddr,
) -> Result<Vec<Requester>, String> {
    let pids = super::peer::owners(server, client).map_err(|e| format!("socket table: {e}"))?;
    if pids.is_empty() {
        return Err(format!("no process owns the client socket {client}"));
    }
    pids.into_iter()
        .map(|pid| attest::attest_pid(pid).map_err(|e| format!("pid {pid}: {e}")))
        .collect()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<ApiState>,
    callers: Arc<Result<Vec<Requester>, String>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let err = |status: StatusCode, code: &str, msg: String| {
        Ok(json_response(status, json!({"code": code, "message": msg})))
    };
    if req.method() != Method::GET {
        return err(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "GET only".into());
    }
    let callers = match callers.as_ref() {
        Ok(c) => c,
        Err(why) => {
            let msg = format!("caller not attested: {why}");
            let _ = state.delivery.notices.send(CredentialNotice::refused(
                "aws_credentials_refused",
                0,
                "no_grant",
                None,
                None,
                msg.clone(),
            ));
            return err(StatusCode::FORBIDDEN, "attestation_failed", msg);
        }
    };
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let refs: Vec<&Requester> = callers.iter().collect();
    let Some(grant_id) = state.delivery.broker.grant_of_token(token) else {
        let msg = format!(
            "unknown or missing authorization token (pid {})",
            refs.first().map_or(0, |c| c.pid)
        );
        let _ = state.delivery.notices.send(CredentialNotice::refused(
            "aws_credentials_refused",
            refs.first().map_or(0, |c| c.pid),
            "no_grant",
            None,
            None,
            msg.clone(),
        ));
        return err(StatusCode::UNAUTHORIZED, "bad_token", msg);
    };
    match aws_credentials(&state, &refs, AwsAsk::Grant(&grant_id)).await {
        Ok((_, m)) => Ok(json_response(
            StatusCode::OK,
            json!({
                "AccessKeyId": m.access_key_id,
                "SecretAccessKey": m.secret_access_key,
                "Token": m.session_token,
                "Expiration": m.expiration.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "RoleArn": m.assumed_role_arn,
            }),
        )),
        Err(e) => {
            err(StatusCode::from_u16(e.status).unwrap_or(StatusCode::FORBIDDEN), e.code, e.message)
        }
    }
}
