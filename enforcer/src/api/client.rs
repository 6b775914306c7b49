//! A small blocking client for the CLI: one request over the Unix socket.
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), request_async(socket, method, path, body))
            .await
            .with_context(|| format!("no answer from {} within 10 s", socket.display()))?
    })
}

async fn request_async(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect to the daemon at {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let bytes = match body {
        Some(v) => Bytes::from(serde_json::to_vec(&v)?),
        None => Bytes::new(),
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(bytes))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    let v = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body).context("daemon answered with invalid JSON")?
    };
    Ok((status, v))
}

/// One request with `fd` attached (SCM_RIGHTS) to its bytes: `grant request --pid` sends the
/// target's pidfd so the daemon binds exactly that process. A plain HTTP/1.1 exchange with
/// `Connection: close`; the daemon always answers with a Content-Length.
pub fn request_with_fd(
    socket: &Path,
    method: &str,
    path: &str,
    body: &serde_json::Value,
    fd: std::os::fd::BorrowedFd<'_>,
) -> Result<(u16, serde_json::Value)> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::io::Read;
    use std::os::fd::{AsRawFd, RawFd};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connect to the daemon at {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let body = serde_json::to_vec(body)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let fds: [RawFd; 1] = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let mut sent = sendmsg::<()>(
        s.as_raw_fd(),
        &[std::io::IoSlice::new(&req)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .context("send the request")?;
    while sent < req.len() {
        sent += nix::sys::socket::send(s.as_raw_fd(), &req[sent..], MsgFlags::MSG_NOSIGNAL)
            .context("send the request")?;
    }
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).context("read the answer")?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed answer from the daemon")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed status line from the daemon")?;
    let v = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).context("daemon answered with invalid JSON")?
    };
    Ok((status, v))
}
