//! OIDC discovery for federation: cloud providers' workload identity federation trusts an
//! issuer by fetching `<issuer>/.well-known/openid-configuration` and the JWKS it names. Served
//! on the mint socket (api/server.rs) and, with `[spiffe] oidc_listen`, on a TCP listener
//! (loopback, or TLS with `oidc_tls_cert` / `oidc_tls_key`). GET only, public keys only.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use super::Spiffe;

/// Path of the discovery document.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// Path of the JWKS (the bundle's JWT keys), under the issuer.
pub const JWKS_PATH: &str = "/keys";

/// The discovery document: what a relying party needs to verify JWT-SVIDs as ID tokens.
pub fn discovery(sp: &Spiffe) -> Value {
    let iss = &sp.cfg.issuer;
    json!({
        "issuer": iss,
        "jwks_uri": format!("{iss}{JWKS_PATH}"),
        // Required members of the OpenID Provider Metadata; this issuer has no login flow.
        "authorization_endpoint": format!("{iss}/authorize"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "grant_id", "intent"],
    })
}

/// The document for a discovery path, if `path` is one.
pub fn route(sp: &Spiffe, path: &str) -> Option<Value> {
    match path {
        DISCOVERY_PATH => Some(discovery(sp)),
        JWKS_PATH => Some(sp.bundle().jwks.clone()),
        _ => None,
    }
}

/// Serves discovery on `addr` (TLS when configured).
pub fn spawn_listener(sp: Arc<Spiffe>, addr: SocketAddr) -> anyhow::Result<()> {
    let tls = match &sp.cfg.oidc_tls {
        Some(t) => {
            let certs = CertificateDer::pem_file_iter(&t.cert)
                .with_context(|| format!("read oidc_tls_cert {}", t.cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parse oidc_tls_cert {}", t.cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(&t.key)
                .with_context(|| format!("read oidc_tls_key {}", t.key.display()))?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .context("oidc_tls_cert / oidc_tls_key")?;
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
        }
        None => None,
    };
    let std_listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("bind oidc_listen {addr}"))?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    tokio::spawn(async move {
        let limit = Arc::new(tokio::sync::Semaphore::new(64));
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else { return };
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (sp, tls) = (sp.clone(), tls.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let svc = service_fn(move |req| handle(req, sp.clone()));
                let serve = async {
                    match tls {
                        Some(acceptor) => {
                            let Ok(s) = acceptor.accept(stream).await else { return };
                            let _ = http1::Builder::new()
                                .timer(hyper_util::rt::TokioTimer::new())
                                .header_read_timeout(Duration::from_secs(5))
                                .serve_connection(TokioIo::new(s), svc)
                                .await;
                        }
                        None => {
                            let _ = http1::Builder::new()
                                .timer(hyper_util::rt::TokioTimer::new())
                                .header_read_timeout(Duration::from_secs(5))
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(30), serve).await;
            });
        }
    });
    Ok(())
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    sp: Arc<Spiffe>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, v) = match (req.method(), route(&sp, req.uri().path())) {
        (&Method::GET, Some(v)) => (StatusCode::OK, v),
        (_, Some(_)) => (
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": {"code": "method_not_allowed", "message": "GET only"}}),
        ),
        (_, None) => (
            StatusCode::NOT_FOUND,
            json!({"error": {"code": "not_found", "message": format!("no route {}", req.uri().path())}}),
        ),
    };
    Ok(crate::api::server::json_response(status, v))
}
