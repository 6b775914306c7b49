//! Syslog sink: RFC 5424 messages in RFC 5425/6587 octet-counting frames ("LEN SP MSG") over TCP,
//! normally TLS (rustls, CA bundle, optional client certificate).
//!
//! Syslog has no application-level acknowledgement: a write that succeeded may still die in the
//! receiver's socket buffer. So a batch counts as delivered only after the connection stayed up
//! for `GRACE` after it was written; if the connection drops first, the delivery loop rewinds to
//! the last committed cursor and sends again (duplicates carry the same event id).
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Item;
use crate::policy::SyslogSinkConfig;

pub const GRACE: Duration = Duration::from_millis(1000);

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

pub struct SyslogSink {
    address: String,
    tls: Option<(tokio_rustls::TlsConnector, rustls_pki_types::ServerName<'static>)>,
    conn: Option<Pin<Box<dyn Stream>>>,
    procid: String,
}

impl SyslogSink {
    /// `name` names the sink in errors.
    pub fn new(name: &str, s: &SyslogSinkConfig) -> Result<SyslogSink> {
        let address = s.address.clone();
        let tls = match &s.tls {
            Some(t) => {
                let host = address.rsplit_once(':').map(|(h, _)| h).unwrap_or(&address);
                Some((
                    tokio_rustls::TlsConnector::from(super::tls::client_config(name, t)?),
                    super::tls::server_name(t, host)?,
                ))
            }
            None => None,
        };
        Ok(SyslogSink { address, tls, conn: None, procid: std::process::id().to_string() })
    }

    async fn connect(&mut self) -> Result<()> {
        let tcp = tokio::net::TcpStream::connect(&self.address)
            .await
            .with_context(|| format!("connect {}", self.address))?;
        tcp.set_nodelay(true)?;
        self.conn = Some(match &self.tls {
            Some((c, name)) => {
                Box::pin(c.connect(name.clone(), tcp).await.context("TLS handshake")?)
            }
            None => Box::pin(tcp),
        });
        Ok(())
    }

    pub async fn send(&mut self, batch: &[Item]) -> Result<()> {
        if self.conn.is_none() {
            tokio::time::timeout(Duration::from_secs(10), self.connect())
                .await
                .map_err(|_| anyhow!("connect timed out"))??;
        }
        let mut buf = Vec::with_capacity(batch.iter().map(|i| i.payload.len() + 200).sum());
        for item in batch {
            let msg = message(item, &self.procid);
            buf.extend_from_slice(format!("{} ", msg.len()).as_bytes());
            buf.extend_from_slice(msg.as_bytes());
        }
        let conn = self.conn.as_mut().expect("connected");
        let res = tokio::time::timeout(Duration::from_secs(10), async {
            conn.write_all(&buf).await?;
            conn.flush().await
        })
        .await;
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e).context("write")
            }
            Err(_) => {
                self.conn = None;
                Err(anyhow!("write timed out"))
            }
        }
    }

    /// Whether the connection is still up: the receiver never sends, so readable means EOF or
    /// an error (it closed or died).
    pub async fn alive(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else { return false };
        let mut b = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(1), conn.read(&mut b)).await {
            Err(_) => true,             // nothing to read: still connected
            Ok(Ok(n)) if n > 0 => true, // a chatty receiver; ignore what it says
            _ => {
                self.conn = None;
                false
            }
        }
    }

    pub fn reset(&mut self) {
        self.conn = None;
    }
}

/// RFC 5424 severity of an event severity.
fn level(sev: &str) -> u8 {
    match sev {
        "critical" => 2,
        "high" => 3,
        "medium" => 4,
        "low" => 5,
        _ => 6,
    }
}

/// SD-PARAM value escaping (RFC 5424 6.3.3): `"`, `\` and `]` get a backslash. Control
/// characters (a newline would end the message on a transport without octet counting) are
/// written as the text `\uXXXX` (a backslash before any other character is a plain backslash
/// to the receiver).
fn sd_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
            out.push(c);
        } else if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
            out.push_str(&format!("\\u{:04X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// MSG on one line: the payload is JSON, which holds no raw control character inside its
/// strings, so a CR, LF or NUL can only be whitespace between tokens (pretty-printed JSON):
/// a space keeps the JSON valid and the message one line for non-octet-counted relays.
fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        std::borrow::Cow::Owned(s.replace(['\r', '\n', '\0'], " "))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// PRINTUSASCII header field of at most `max` characters, "-" when empty.
fn header_field(s: &str, max: usize) -> String {
    let v: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if v.is_empty() { "-".into() } else { v }
}

/// One RFC 5424 message: facility authpriv (10), the event as structured data for filtering in
/// the collector, and the rendered event (JSON or OCSF) as MSG.
pub fn message(item: &Item, procid: &str) -> String {
    let e = &item.event;
    let pri = 10 * 8 + level(&e.severity) as u32;
    // TIME-SECFRAC allows at most 6 digits.
    let ts = chrono::DateTime::parse_from_rfc3339(&e.time)
        .map(|t| t.with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|_| "-".into());
    format!(
        "<{pri}>1 {ts} {} enforcer {} {} [enforcer@32473 id=\"{}\" verdict=\"{}\" action=\"{}\" severity=\"{}\"] {}",
        header_field(&e.host, 255),
        header_field(procid, 128),
        header_field(&e.kind, 32),
        sd_escape(&e.id),
        sd_escape(&e.verdict),
        sd_escape(&e.action),
        sd_escape(&e.severity),
        one_line(&item.payload)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn event(id: &str, verdict: &str, host: &str) -> Event {
        serde_json::from_value(serde_json::json!({
            "schema": "enforcer.event/v1", "id": id, "time": "2026-01-02T03:04:05.123456789Z",
            "host": host, "kind": "connect", "verdict": verdict, "action": "alerted",
            "mode": "monitor", "severity": "high",
            "process": { "pid": 1, "ppid": 0, "uid": 0, "exe": "/x\n<13>1 forged",
                         "cmdline": "a\nb\"]", "cgroup": "/" },
        }))
        .unwrap()
    }

    /// The structured data of a message, parsed as RFC 5424 says: (name, value) pairs.
    fn sd_params(msg: &str) -> (Vec<(String, String)>, &str) {
        let start = msg.find("[enforcer@32473 ").expect("SD element") + 16;
        let mut params = Vec::new();
        let b: Vec<char> = msg[start..].chars().collect();
        let mut i = 0;
        loop {
            let mut name = String::new();
            while b[i] != '=' {
                name.push(b[i]);
                i += 1;
            }
            assert_eq!(b[i + 1], '"');
            i += 2;
            let mut v = String::new();
            loop {
                match b[i] {
                    '\\' if matches!(b[i + 1], '"' | '\\' | ']') => {
                        v.push(b[i + 1]);
                        i += 2;
                    }
                    '"' => break,
                    c => {
                        v.push(c);
                        i += 1;
                    }
                }
            }
            params.push((name, v));
            i += 1;
            match b[i] {
                ' ' => i += 1,
                ']' => break,
                c => panic!("after a param: {c:?} in {msg}"),
            }
        }
        let consumed: usize = b[..=i].iter().map(|c| c.len_utf8()).sum();
        (params, &msg[start + consumed..])
    }

    #[test]
    fn structured_data_and_msg_survive_hostile_values() {
        let e = event("id\"] [x@1 y=\"z\"]\\", "no_grant\n<13>1 - forged", "host\nname ]");
        let payload = serde_json::to_string_pretty(&e).unwrap();
        let msg = message(&Item { event: e.clone(), payload }, "42");
        assert!(!msg.contains(['\n', '\r', '\0']), "{msg}");
        let (params, rest) = sd_params(&msg);
        assert_eq!(params[0], ("id".into(), e.id.clone()));
        assert_eq!(params[1], ("verdict".into(), "no_grant\\u000A<13>1 - forged".into()));
        assert_eq!(params.len(), 4, "{params:?}");
        // MSG: the whole event, still valid JSON, on one line.
        let back: Event = serde_json::from_str(rest.trim_start()).unwrap();
        assert_eq!(back, e);
        // HOSTNAME: printable ASCII, no space.
        let host = msg.split(' ').nth(2).unwrap();
        assert_eq!(host, "hostname]");
    }
}
