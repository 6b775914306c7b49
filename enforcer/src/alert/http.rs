//! A small HTTPS/1.1 client (hyper over tokio-rustls) for the webhook and HEC sinks: one kept-
//! alive connection, a POST per batch, success only on a 2xx answer.
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::policy::SinkConfig;

const TIMEOUT: Duration = Duration::from_secs(10);

/// `https://host[:port]/path`; alerts carry process and secret names, so never plain http.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url> {
        let rest = s.strip_prefix("https://").ok_or_else(|| anyhow!("not an https:// URL"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            bail!("credentials in the URL are not supported");
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| anyhow!("unclosed ["))?;
            (format!("[{h}]"), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| anyhow!("bad port"))?,
            None => 443,
        };
        if host.is_empty() || host == "[]" || port == 0 || path.contains(char::is_whitespace) {
            bail!("bad URL");
        }
        Ok(Url { host, port, path: path.to_string() })
    }

    fn connect_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

pub struct Client {
    url: Url,
    tls: tokio_rustls::TlsConnector,
    server_name: rustls_pki_types::ServerName<'static>,
    /// Extra headers, Authorization included; values never logged.
    headers: Vec<(String, String)>,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    pub fn new(s: &SinkConfig, extra: Vec<(String, String)>) -> Result<Client> {
        let url = Url::parse(s.url.as_deref().unwrap_or_default())?;
        let tls = tokio_rustls::TlsConnector::from(super::tls::client_config(s)?);
        let server_name = super::tls::server_name(s, &url.host)?;
        let mut headers = s.headers.clone();
        headers.extend(extra);
        Ok(Client { url, tls, server_name, headers, conn: None })
    }

    async fn connect(&mut self) -> Result<&mut SendRequest<Full<Bytes>>> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            let tcp = tokio::net::TcpStream::connect((self.url.connect_host(), self.url.port))
                .await
                .with_context(|| format!("connect {}:{}", self.url.host, self.url.port))?;
            tcp.set_nodelay(true)?;
            let tls =
                self.tls.connect(self.server_name.clone(), tcp).await.context("TLS handshake")?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.conn = Some(sender);
        }
        Ok(self.conn.as_mut().expect("connected"))
    }

    /// POSTs `body`; Ok only when the receiver answered 2xx.
    pub async fn post(&mut self, content_type: &str, body: Vec<u8>) -> Result<()> {
        let res = tokio::time::timeout(TIMEOUT, self.post_inner(content_type, body)).await;
        let res = res.unwrap_or_else(|_| Err(anyhow!("no answer within {TIMEOUT:?}")));
        if res.is_err() {
            self.conn = None;
        }
        res
    }

    async fn post_inner(&mut self, content_type: &str, body: Vec<u8>) -> Result<()> {
        let host = if self.url.port == 443 {
            self.url.host.clone()
        } else {
            format!("{}:{}", self.url.host, self.url.port)
        };
        let mut req = hyper::Request::post(&self.url.path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .header(hyper::header::USER_AGENT, concat!("enforcer/", env!("CARGO_PKG_VERSION")));
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(Full::new(Bytes::from(body)))?;
        let sender = self.connect().await?;
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            bail!("HTTP {status}: {text}");
        }
        Ok(())
    }
}
