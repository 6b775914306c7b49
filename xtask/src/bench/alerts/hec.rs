//! A Splunk HEC stand-in for the alert rounds: HTTPS on loopback with a certificate of a
//! throw-away CA, counting the events it accepts.

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(super) const HEC_TOKEN: &str = "bench-hec-token";

/// A Splunk HEC stand-in: HTTPS (rustls, certificate of a throw-away CA), checks the method,
/// path and token, counts the concatenated event objects and answers 200.
pub(super) struct HecReceiver {
    pub(super) port: u16,
    pub(super) ca: PathBuf,
    pub(super) events: Arc<AtomicU64>,
    pub(super) rejected: Arc<AtomicU64>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) conns: Arc<Mutex<Vec<TcpStream>>>,
    /// Connection errors while running (printed after the round).
    pub(super) errors: Arc<Mutex<Vec<String>>>,
}

impl HecReceiver {
    pub(super) fn start(dir: &Path) -> Result<HecReceiver> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])?.signed_by(&key, &ca)?;
        let ca_path = dir.join("hec-ca.pem");
        std::fs::write(&ca_path, ca.pem())?;
        let tls = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?,
        );
        let l = TcpListener::bind("127.0.0.1:0").context("bench: cannot bind the HEC receiver")?;
        l.set_nonblocking(true)?;
        let port = l.local_addr()?.port();
        let r = HecReceiver {
            port,
            ca: ca_path,
            events: Arc::default(),
            rejected: Arc::default(),
            stop: Arc::default(),
            conns: Arc::default(),
            errors: Arc::default(),
        };
        let (stop, conns, events, rejected) =
            (r.stop.clone(), r.conns.clone(), r.events.clone(), r.rejected.clone());
        let errors = r.errors.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        if let Ok(c) = s.try_clone() {
                            conns.lock().unwrap().push(c);
                        }
                        let (tls, events, rejected, errors, stop) = (
                            tls.clone(),
                            events.clone(),
                            rejected.clone(),
                            errors.clone(),
                            stop.clone(),
                        );
                        std::thread::spawn(move || {
                            let Ok(conn) = rustls::ServerConnection::new(tls) else { return };
                            let mut s = rustls::StreamOwned::new(conn, s);
                            if let Err(e) = serve_hec(&mut s, &events, &rejected)
                                && !stop.load(Ordering::SeqCst)
                            {
                                errors.lock().unwrap().push(e.to_string());
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(r)
    }

    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for HecReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_hec(
    s: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    events: &AtomicU64,
    rejected: &AtomicU64,
) -> std::io::Result<()> {
    const OBJECT: &[u8] = b"\"sourcetype\":\"enforcer\"";
    let auth = format!("authorization: splunk {HEC_TOKEN}").to_ascii_lowercase();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let end = loop {
            if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break e;
            }
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0);
        while buf.len() < end + 4 + len {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let ok = head.starts_with("post /services/collector/event http/1.1")
            && head.lines().any(|l| l.trim() == auth);
        let body = &buf[end + 4..end + 4 + len];
        let reply: &[u8] = if ok {
            let n = body.windows(OBJECT.len()).filter(|w| *w == OBJECT).count();
            events.fetch_add(n as u64, Ordering::SeqCst);
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 27\r\n\r\n{\"text\":\"Success\",\"code\":0}"
        } else {
            rejected.fetch_add(1, Ordering::SeqCst);
            b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n"
        };
        buf.drain(..end + 4 + len);
        s.write_all(reply)?;
        s.flush()?;
    }
}
