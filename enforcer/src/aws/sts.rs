//! STS AssumeRole over the Query API (a signed form POST), off every decision path: called
//! by the broker only when a granted process asks for credentials and none are cached.
//! Bounded by `TIMEOUT`; the answer's XML is small and read for four elements only.
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

use super::sigv4::{self, BaseCredentials, uri_encode};
use crate::policy::{AwsIntent, AwsSettings};

/// Connect, TLS, request and answer together.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// STS answers are a few KiB.
const MAX_ANSWER: usize = 256 * 1024;
/// STS's minimum session duration.
pub const MIN_DURATION_S: u64 = 900;
/// The default maximum session of an IAM role (longer asks are refused by STS unless the
/// role allows them): grants are minutes long anyway.
pub const MAX_DURATION_S: u64 = 3600;

/// Temporary credentials STS issued.
#[derive(Clone)]
pub struct Minted {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: DateTime<Utc>,
    /// The assumed-role ARN STS reports (contains the session name).
    pub assumed_role_arn: String,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Minted({} until {})", self.access_key_id, self.expiration)
    }
}

/// The daemon's base credentials: `credentials_file` (profile) when configured, else the
/// daemon's own environment. Read at each call, so a rotated file is picked up.
pub fn base_credentials(s: &AwsSettings) -> Result<BaseCredentials> {
    if let Some(path) = &s.credentials_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read [aws] credentials_file {}", path.display()))?;
        return from_ini(&text, &s.profile).with_context(|| {
            format!("[aws] credentials_file {}, profile {}", path.display(), s.profile)
        });
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(a), Some(s)) => Ok(BaseCredentials {
            access_key_id: a,
            secret_access_key: s,
            session_token: var("AWS_SESSION_TOKEN"),
        }),
        _ => bail!(
            "the daemon has no AWS base credentials: set [aws] credentials_file, or \
             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the daemon's environment"
        ),
    }
}

/// A profile of an AWS shared-credentials file.
fn from_ini(text: &str, profile: &str) -> Result<BaseCredentials> {
    let mut section = String::new();
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_string();
            continue;
        }
        if section != profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => {
            Ok(BaseCredentials { access_key_id, secret_access_key, session_token: token })
        }
        _ => bail!("no aws_access_key_id / aws_secret_access_key in that profile"),
    }
}

/// The form body of AssumeRole, keys in order.
pub fn assume_role_body(aws: &AwsIntent, session_name: &str, duration_s: u64) -> String {
    let mut params: Vec<(&str, String)> = vec![
        ("Action", "AssumeRole".into()),
        ("DurationSeconds", duration_s.to_string()),
        ("RoleArn", aws.role_arn.clone()),
        ("RoleSessionName", session_name.into()),
        ("Version", "2011-06-15".into()),
    ];
    if let Some(p) = &aws.session_policy_json {
        params.push(("Policy", p.clone()));
    }
    params.sort_by(|a, b| a.0.cmp(b.0));
    params.iter().map(|(k, v)| format!("{k}={}", uri_encode(v))).collect::<Vec<_>>().join("&")
}

/// Calls STS AssumeRole. Errors never contain a secret (STS's own error code and message).
pub async fn assume_role(
    base: &BaseCredentials,
    aws: &AwsIntent,
    session_name: &str,
    duration_s: u64,
) -> Result<Minted> {
    tokio::time::timeout(TIMEOUT, assume_role_inner(base, aws, session_name, duration_s))
        .await
        .unwrap_or_else(|_| {
            Err(anyhow!("STS {} did not answer within {TIMEOUT:?}", aws.sts_endpoint.url()))
        })
}

async fn assume_role_inner(
    base: &BaseCredentials,
    aws: &AwsIntent,
    session_name: &str,
    duration_s: u64,
) -> Result<Minted> {
    let ep = &aws.sts_endpoint;
    let body = assume_role_body(aws, session_name, duration_s);
    let content_type = "application/x-www-form-urlencoded; charset=utf-8";
    let amz_date = Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let host = ep.authority();
    let signed =
        sigv4::sign_post(base, &aws.region, "sts", &host, content_type, body.as_bytes(), &amz_date);
    let mut req = hyper::Request::post("/")
        .header(hyper::header::HOST, &host)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(hyper::header::USER_AGENT, concat!("enforcer/", env!("CARGO_PKG_VERSION")));
    for (k, v) in signed {
        req = req.header(k, v);
    }
    let req = req.body(Full::new(Bytes::from(body)))?;
    let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
        .await
        .with_context(|| format!("connect to STS {}", ep.url()))?;
    tcp.set_nodelay(true)?;
    let (status, answer) = if ep.https {
        let name = rustls_pki_types::ServerName::try_from(ep.host.clone())
            .with_context(|| format!("invalid TLS server name {:?}", ep.host))?;
        let tls = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, tcp)
            .await
            .context("TLS handshake with STS")?;
        send(TokioIo::new(tls), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    let text = String::from_utf8_lossy(&answer);
    if !status.is_success() {
        let code = element(&text, "Code").unwrap_or_default();
        let msg = element(&text, "Message").unwrap_or_default();
        bail!("STS {} refused AssumeRole ({status}): {code} {msg}", ep.url());
    }
    parse_answer(&text)
}

async fn send<T>(
    io: TokioIo<T>,
    req: hyper::Request<Full<Bytes>>,
) -> Result<(hyper::StatusCode, Bytes)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.context("STS request")?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the STS answer: {e}"))?
        .to_bytes();
    Ok((status, body))
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    if let Some(c) = CONFIG.get() {
        return Ok(c.clone());
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        bail!("no system CA certificates to verify STS with");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(CONFIG.get_or_init(|| Arc::new(cfg)).clone())
}

/// The credentials of an AssumeRoleResponse.
pub fn parse_answer(xml: &str) -> Result<Minted> {
    let get = |name: &str| element(xml, name).ok_or_else(|| anyhow!("STS answer has no <{name}>"));
    let expiration = get("Expiration")?;
    let expiration = DateTime::parse_from_rfc3339(&expiration)
        .with_context(|| format!("STS Expiration {expiration:?}"))?
        .with_timezone(&Utc);
    Ok(Minted {
        access_key_id: get("AccessKeyId")?,
        secret_access_key: get("SecretAccessKey")?,
        session_token: get("SessionToken")?,
        expiration,
        assumed_role_arn: element(xml, "Arn").unwrap_or_default(),
    })
}

/// The text of the first `<name>...</name>`, XML entities decoded.
fn element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    let raw = xml[start..end].trim();
    Some(
        raw.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_answer() {
        let xml = r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <AssumedRoleUser><AssumedRoleId>AROA:g_x</AssumedRoleId>
      <Arn>arn:aws:sts::123456789012:assumed-role/deploy/g_x</Arn></AssumedRoleUser>
    <Credentials>
      <SessionToken>FQo/a+b=&amp;</SessionToken>
      <SecretAccessKey>wJalr/K7</SecretAccessKey>
      <Expiration>2026-11-30T07:00:00.000Z</Expiration>
      <AccessKeyId>ASIAEXAMPLE</AccessKeyId>
    </Credentials>
  </AssumeRoleResult></AssumeRoleResponse>"#;
        let m = parse_answer(xml).unwrap();
        assert_eq!(m.access_key_id, "ASIAEXAMPLE");
        assert_eq!(m.session_token, "FQo/a+b=&");
        assert_eq!(m.assumed_role_arn, "arn:aws:sts::123456789012:assumed-role/deploy/g_x");
        assert_eq!(m.expiration.to_rfc3339(), "2026-11-30T07:00:00+00:00");
        assert!(!format!("{m:?}").contains("wJalr"));
        assert!(parse_answer("<x/>").is_err());
    }

    #[test]
    fn reads_a_profile() {
        let ini = "[default]\naws_access_key_id = A\naws_secret_access_key=B\n[ci]\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token=T\n";
        let c = from_ini(ini, "ci").unwrap();
        assert_eq!((c.access_key_id.as_str(), c.session_token.as_deref()), ("C", Some("T")));
        assert_eq!(from_ini(ini, "default").unwrap().access_key_id, "A");
        assert!(from_ini(ini, "nope").is_err());
    }
}
