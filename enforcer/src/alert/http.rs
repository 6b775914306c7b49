//! A small HTTPS/1.1 client (hyper over tokio-rustls) for the webhook and HEC sinks: one kept-
//! alive connection, a POST per batch, success only on a 2xx answer.
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::policy::{HttpsSinkConfig, HttpsUrl};

const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Client {
    url: HttpsUrl,
    tls: tokio_rustls::TlsConnector,
    server_name: rustls_pki_types::ServerName<'static>,
    /// Extra headers, Authorization included; values never logged.
    headers: Vec<(String, String)>,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// `sink` names the sink in errors.
    pub fn new(sink: &str, s: &HttpsSinkConfig, extra: Vec<(String, String)>) -> Result<Client> {
        let url = s.url.clone();
        let tls = tokio_rustls::TlsConnector::from(super::tls::client_config(sink, &s.tls)?);
        let server_name = super::tls::server_name(&s.tls, &url.host)?;
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
        let mut req = hyper::Request::post(&self.url.path)
            .header(hyper::header::HOST, self.url.authority())
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
