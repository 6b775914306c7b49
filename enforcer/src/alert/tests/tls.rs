//! Sinks over TLS against loopback receivers (TLS syslog, HTTPS Splunk HEC) that die or
//! refuse mid-stream: every id still arrives, in order.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{assert_all_in_order, config, wait_for, write_events};
use crate::alert::spawn;
use crate::store::EventStore;
use crate::sync::LockOrRecover;

struct Pki {
    ca: PathBuf,
    server: Arc<rustls::ServerConfig>,
}

fn pki(dir: &Path) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    Pki { ca: ca_path, server: Arc::new(server) }
}

/// A TLS syslog receiver (octet-counting frames) recording event ids; aborting the handle kills
/// it, unread data included.
fn syslog_receiver(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    got: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            let got = got.clone();
            conns.spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else { return };
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 65536];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // "LEN SP MSG" frames.
                    while let Some(sp) = buf.iter().position(|&b| b == b' ') {
                        let len: usize =
                            std::str::from_utf8(&buf[..sp]).unwrap().parse().expect("octet count");
                        if buf.len() < sp + 1 + len {
                            break;
                        }
                        let msg = String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap();
                        buf.drain(..sp + 1 + len);
                        assert!(
                            msg.starts_with("<8") && msg[4..].starts_with("1 ")
                                || msg.starts_with("<8"),
                            "not RFC 5424: {msg}"
                        );
                        let id = msg
                            .split("id=\"")
                            .nth(1)
                            .and_then(|r| r.split('"').next())
                            .unwrap()
                            .to_string();
                        let json = &msg[msg.find("] ").unwrap() + 2..];
                        assert_eq!(serde_json::from_str::<Value>(json).unwrap()["id"], id.as_str());
                        got.lock_or_recover().push(id);
                    }
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_tls_receiver_killed_and_restarted_gets_every_id() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let pki = pki(dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let rx = syslog_receiver(listener, pki.server.clone(), got.clone());
    let cfg = config(
        &state,
        &format!(
            "[[sink]]\nname = \"sl\"\ntype = \"syslog\"\naddress = \"127.0.0.1:{}\"\ntls = true\nca_file = \"{}\"\nserver_name = \"localhost\"\n",
            addr.port(),
            pki.ca.display()
        ),
    );
    let mut store = EventStore::open(&state).unwrap();
    let sinks = spawn(&cfg, &state, "h").unwrap();
    let n = 6000u64;
    let writer = std::thread::spawn(move || {
        for k in 0..(n / 100) {
            write_events(&mut store, k * 100..(k + 1) * 100);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    wait_for("some ids", 10, || got.lock_or_recover().len() > 500).await;
    rx.abort(); // the receiver dies mid-stream
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _rx = syslog_receiver(listener, pki.server.clone(), got.clone());
    writer.join().unwrap();
    wait_for("every id after the receiver came back", 30, || {
        got.lock_or_recover().iter().collect::<HashSet<_>>().len() as u64 >= n
    })
    .await;
    assert_all_in_order(&got.lock_or_recover(), n);
    let m = sinks.metrics_text();
    assert!(
        !m.contains("enforcer_sink_delivery_failures_total{sink=\"sl\",type=\"syslog\"} 0"),
        "the outage must show as failures:\n{m}"
    );
    sinks.shutdown().await;
}

/// A minimal HTTPS HEC endpoint: checks the token and the concatenated-object framing, records
/// event ids; answers 503 while `down` is set.
fn hec_receiver(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    got: Arc<Mutex<Vec<String>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
) {
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, got, down) = (acceptor.clone(), got.clone(), down.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else { return };
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 65536];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap();
                    while buf.len() < end + 4 + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buf[end + 4..end + 4 + len].to_vec();
                    buf.drain(..end + 4 + len);
                    assert!(head.starts_with("POST /services/collector/event HTTP/1.1"), "{head}");
                    let authorized = head.lines().any(|l| {
                        l == "authorization: Splunk tok-123" || l == "Authorization: Splunk tok-123"
                    });
                    let reply = if !authorized {
                        "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n"
                    } else if down.load(std::sync::atomic::Ordering::Relaxed) {
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                    } else {
                        for obj in serde_json::Deserializer::from_slice(&body).into_iter::<Value>()
                        {
                            let obj = obj.expect("concatenated JSON objects");
                            assert_eq!(obj["sourcetype"], "enforcer");
                            assert_eq!(obj["host"], "test-host");
                            assert!(obj["time"].as_f64().unwrap() > 1.6e9);
                            got.lock_or_recover()
                                .push(obj["event"]["id"].as_str().unwrap().to_string());
                        }
                        "HTTP/1.1 200 OK\r\ncontent-length: 27\r\n\r\n{\"text\":\"Success\",\"code\":0}"
                    };
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splunk_hec_over_https_with_outage() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let pki = pki(dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    hec_receiver(listener, pki.server.clone(), got.clone(), down.clone());
    let cfg = config(
        &state,
        &format!(
            "[[sink]]\nname = \"hec\"\ntype = \"splunk_hec\"\nurl = \"https://localhost:{port}/services/collector/event\"\ntoken = \"tok-123\"\nca_file = \"{}\"\n",
            pki.ca.display()
        ),
    );
    let mut store = EventStore::open(&state).unwrap();
    let sinks = spawn(&cfg, &state, "test-host").unwrap();
    write_events(&mut store, 0..1000);
    wait_for("first events", 10, || got.lock_or_recover().len() >= 1000).await;
    down.store(true, std::sync::atomic::Ordering::Relaxed);
    write_events(&mut store, 1000..3000);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(sinks.metrics_text().contains("enforcer_sink_up{sink=\"hec\",type=\"splunk_hec\"} 0"));
    down.store(false, std::sync::atomic::Ordering::Relaxed);
    wait_for("the backlog", 20, || got.lock_or_recover().len() >= 3000).await;
    assert_all_in_order(&got.lock_or_recover(), 3000);
    sinks.shutdown().await;
}
