//! Loopback listeners, and the TLS receivers (RFC 5425 syslog, Splunk HEC) that the sink
//! tests deliver alerts to.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// A loopback TCP listener that accepts and drops connections (up to 64), on a free port.
pub fn tcp_listener() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().take(64) {
            drop(s);
        }
    });
    port
}

/// A loopback HTTP listener on `addr` answering one request per connection (up to 16), for
/// curl.
pub fn http_listener(addr: &str) -> u16 {
    let l = TcpListener::bind(addr).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().take(16) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    port
}

pub type TlsStream = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// Serves one connection, recording what arrived in `got`.
pub type Serve = fn(&mut TlsStream, &Mutex<Vec<String>>) -> std::io::Result<()>;

/// A TLS listener on loopback whose connections are handled by `serve` on their own threads;
/// `kill` closes the listener and every connection at once, unread data included.
pub struct Receiver {
    pub port: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Receiver {
    /// Listens on `port` (0: a free one).
    pub fn start(
        port: u16,
        tls: Arc<rustls::ServerConfig>,
        got: Arc<Mutex<Vec<String>>>,
        serve: Serve,
    ) -> Receiver {
        let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (stop2, conns2) = (stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        conns2.lock().unwrap().push(s.try_clone().unwrap());
                        let (tls, got) = (tls.clone(), got.clone());
                        std::thread::spawn(move || {
                            let conn = rustls::ServerConnection::new(tls).unwrap();
                            let mut s = rustls::StreamOwned::new(conn, s);
                            let _ = serve(&mut s, &got);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Receiver { port, stop, conns }
    }

    pub fn kill(self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// RFC 5425 octet-counted RFC 5424 messages; records the SD `id` of each.
pub fn serve_syslog(s: &mut TlsStream, got: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(sp) = buf.iter().position(|&b| b == b' ') {
            let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().expect("octet count");
            if buf.len() < sp + 1 + len {
                break;
            }
            let msg = String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap();
            buf.drain(..sp + 1 + len);
            let version = msg.split_once('>').map(|(_, r)| r.starts_with("1 ")).unwrap_or(false);
            assert!(msg.starts_with('<') && version, "not RFC 5424: {msg}");
            let id =
                msg.split("id=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
            got.lock().unwrap().push(id);
        }
    }
}

/// The token `serve_hec` accepts.
pub const HEC_TOKEN: &str = "tok-e2e";

/// HEC: `Authorization: Splunk <HEC_TOKEN>` and concatenated `{"time","host","sourcetype","event"}`
/// from host `test-host`; records each event's `id`.
pub fn serve_hec(s: &mut TlsStream, got: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
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
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        while buf.len() < end + 4 + len {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[end + 4..end + 4 + len].to_vec();
        buf.drain(..end + 4 + len);
        assert!(head.starts_with("POST /services/collector/event HTTP/1.1"), "{head}");
        let auth = format!("authorization: Splunk {HEC_TOKEN}");
        let ok = head.lines().any(|l| l.eq_ignore_ascii_case(&auth));
        let reply: &str = if ok {
            for obj in serde_json::Deserializer::from_slice(&body).into_iter::<Value>() {
                let obj = obj.expect("concatenated JSON objects");
                assert_eq!(obj["sourcetype"], "enforcer");
                assert_eq!(obj["host"], "test-host");
                got.lock().unwrap().push(obj["event"]["id"].as_str().unwrap().to_string());
            }
            "HTTP/1.1 200 OK\r\ncontent-length: 27\r\n\r\n{\"text\":\"Success\",\"code\":0}"
        } else {
            "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n"
        };
        s.write_all(reply.as_bytes())?;
        s.flush()?;
    }
}
