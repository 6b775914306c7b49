//! Raw bytes as what a client sends on the mint socket: hyper's HTTP/1.1 server parses them
//! and the API's own handling runs on every request it yields (routing, the 64 KiB body limit,
//! grant-request bodies, list queries: `api::server::answer_stateless`). Nothing may panic or
//! hang; every response is a known status with a JSON body, errors in the documented
//! `{"error": {"code", "message"}}` shape, a body over the limit is 413.
#![no_main]

use std::sync::OnceLock;

use enforcer::api::server::answer_stateless;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let out = runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let conn = http1::Builder::new()
            .serve_connection(TokioIo::new(server), service_fn(answer_stateless));
        let serve = tokio::spawn(conn);
        // Everything the client sends, then end of input; the server answers what it parsed.
        let data = data.to_vec();
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&data).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        });
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), writer)
            .await
            .expect("the server neither answered nor closed within 5 s")
            .unwrap();
        let _ = serve.await;
        out
    });
    check_responses(&out);
});

/// Walks the responses hyper wrote: status lines, Content-Length, JSON bodies.
fn check_responses(mut out: &[u8]) {
    while !out.is_empty() {
        let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
            panic!("truncated response head: {:?}", String::from_utf8_lossy(out));
        };
        let head = std::str::from_utf8(&out[..end]).expect("response head is UTF-8");
        let status: u16 = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status");
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let rest = &out[end + 4..];
        // 100 Continue (Expect: 100-continue), and answers to HEAD (a length, no body).
        if status == 100 || rest.len() < len || (len > 0 && rest.starts_with(b"HTTP/1.")) {
            out = rest;
            continue;
        }
        let body = &rest[..len];
        out = &rest[len..];
        // hyper's own answers to unparsable input (400, 431, 505, ...) carry no body.
        if len == 0 {
            assert!(status >= 400, "empty success: {head}");
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(body).expect("JSON body");
        match status {
            200 => assert!(v["ok"].is_string(), "{v}"),
            400 | 404 | 405 | 413 => {
                assert!(v["error"]["code"].is_string() && v["error"]["message"].is_string(), "{v}")
            }
            other => panic!("unexpected status {other}: {v}"),
        }
        if status == 413 {
            assert_eq!(v["error"]["code"], "body_too_large");
        }
    }
}
