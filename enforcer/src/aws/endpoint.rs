//! The AWS container-credentials endpoint on loopback (what the SDKs read from
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI`, sending the content of
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` as `Authorization`). The token only says which
//! grant is meant: the kernel says who is asking. The client socket's owners are found
//! (`peer`: among the grant's holders in PROC_GRANTS first) and attested by pidfd; each must
//! hold the token's grant live. Attested once per connection and grant.
use std::convert::Infallible;
use std::net::SocketAddr;
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

/// One client connection: where it comes from, and the callers attested for a grant (kept
/// for the connection's later requests for the same grant).
struct Conn {
    server: SocketAddr,
    client: SocketAddr,
    attested: tokio::sync::Mutex<Option<(String, Vec<Requester>)>>,
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
            let conn = Arc::new(Conn { server, client, attested: Default::default() });
            let svc = service_fn(move |req| handle(req, state.clone(), conn.clone()));
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

/// The processes holding the client socket, attested by pidfd: looked for among the
/// grant's holders (their fds only); if none of them has it, every process is looked at,
/// so the refusal names who asked. Blocking (/proc reads).
fn callers(state: &ApiState, conn: &Conn, grant_id: &str) -> Result<Vec<Requester>, String> {
    let t0 = std::time::Instant::now();
    let inode = super::peer::client_inode(conn.server, conn.client)
        .map_err(|e| format!("socket table: {e}"))?
        .ok_or_else(|| format!("no client socket {} in the socket table", conn.client))?;
    let t_inode = t0.elapsed().as_micros() as u64;
    let view = state.delivery.view.load();
    let holders: Vec<u32> = view
        .grants
        .iter()
        .find(|(_, g)| g.id == grant_id)
        .map(|(slot, _)| {
            state.delivery.maps.holders_of(*slot).into_iter().map(|(p, _)| p).collect()
        })
        .unwrap_or_default();
    let t_holders = t0.elapsed().as_micros() as u64;
    let mut owners = super::peer::owners_among(inode, &holders);
    tracing::debug!(
        us = t0.elapsed().as_micros() as u64,
        t_inode,
        t_holders,
        holders = holders.len(),
        found = owners.len(),
        "AWS endpoint: socket owners among the grant's holders"
    );
    if owners.is_empty() {
        owners = super::peer::owners_of_inode(inode);
    }
    if owners.is_empty() {
        return Err(format!("no process holds the client socket {}", conn.client));
    }
    owners
        .into_iter()
        .map(|pid| attest::attest_pid(pid).map_err(|e| format!("pid {pid}: {e}")))
        .collect()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<ApiState>,
    conn: Arc<Conn>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let err = |status: StatusCode, code: &str, msg: String| {
        Ok(json_response(status, json!({"code": code, "message": msg})))
    };
    if req.method() != Method::GET {
        return err(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "GET only".into());
    }
    let refused = |pid: u32, msg: &str| {
        let _ = state.delivery.notices.send(CredentialNotice::refused(
            "aws_credentials_refused",
            pid,
            "no_grant",
            None,
            None,
            msg.to_string(),
        ));
    };
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Some(grant_id) = state.delivery.broker.grant_of_token(token) else {
        let msg = format!("unknown or missing authorization token from {}", conn.client);
        refused(0, &msg);
        return err(StatusCode::UNAUTHORIZED, "bad_token", msg);
    };
    let mut attested = conn.attested.lock().await;
    if attested.as_ref().is_none_or(|(g, _)| *g != grant_id) {
        let (st, c, g) = (state.clone(), conn.clone(), grant_id.clone());
        let t0 = std::time::Instant::now();
        let found = tokio::task::spawn_blocking(move || callers(&st, &c, &g))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        tracing::debug!(us = t0.elapsed().as_micros() as u64, "AWS endpoint: caller attested");
        match found {
            Ok(callers) => *attested = Some((grant_id.clone(), callers)),
            Err(why) => {
                let msg = format!("caller not attested: {why}");
                refused(0, &msg);
                return err(StatusCode::FORBIDDEN, "attestation_failed", msg);
            }
        }
    }
    let refs: Vec<&Requester> =
        attested.as_ref().map(|(_, c)| c.iter().collect()).unwrap_or_default();
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
            // Refused: attest again on the next request (the state may change).
            *attested = None;
            err(StatusCode::from_u16(e.status).unwrap_or(StatusCode::FORBIDDEN), e.code, e.message)
        }
    }
}
