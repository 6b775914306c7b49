//! AWS credential serving from the daemon's loopback container-credentials endpoint, as a
//! granted Rust client sees it: a worker in the bench cgroup holding a grant of the
//! credentials intent GETs the endpoint with its authorization token, on one kept-alive
//! connection and then on a new connection per request (each new connection is attested
//! again: socket table lookup, the grant holders' fds, pidfd). The daemon's STS is a
//! stand-in on loopback written here: the bench never reaches a real AWS endpoint, and after
//! the first AssumeRole every answer comes from the daemon's cache.

use anyhow::{Context, Result, anyhow, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Timed requests on the kept-alive connection, and on new connections, per round (after
/// `WARMUP` untimed ones: the first mints through the stand-in, the others warm the cache).
pub const KEPT_ALIVE: u64 = 5_000;
pub const NEW_CONN: u64 = 1_000;
const WARMUP: u64 = 200;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A loopback stand-in for STS: answers every request with an AssumeRole result valid for an
/// hour, and counts the requests.
pub struct StsStandIn {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
}

impl StsStandIn {
    pub fn start() -> Result<StsStandIn> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("bench: cannot bind the STS stand-in")?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let count = requests.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                let _ = answer_assume_role(s);
            }
        });
        Ok(StsStandIn { addr, requests })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Reads one request (headers and body) and answers it; the connection is closed after.
fn answer_assume_role(s: TcpStream) -> Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut r = BufReader::new(s);
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("closed in the headers");
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse()?;
        }
    }
    let mut body = vec![0; length.min(1 << 20)];
    r.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body);
    let session = body
        .split('&')
        .find_map(|kv| kv.strip_prefix("RoleSessionName="))
        .unwrap_or("bench")
        .to_string();
    // An hour ahead, as RFC 3339 without a date library: the daemon's clock is this one.
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 3600;
    let xml = format!(
        "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>\
         <AssumedRoleUser><AssumedRoleId>AROABENCH:{session}</AssumedRoleId>\
         <Arn>arn:aws:sts::123456789012:assumed-role/bench/{session}</Arn></AssumedRoleUser>\
         <Credentials><AccessKeyId>ASIABENCH</AccessKeyId><SecretAccessKey>benchsecret</SecretAccessKey>\
         <SessionToken>benchtoken</SessionToken><Expiration>{}</Expiration></Credentials>\
         </AssumeRoleResult></AssumeRoleResponse>",
        rfc3339(exp)
    );
    let mut s = r.into_inner();
    write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
        xml.len()
    )?;
    Ok(())
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// The worker's loops. `go` is the line the bench sent once the grant was bound:
/// `go <credentials_full_uri> <authorization_token_file>`. Times `n` GETs on one kept-alive
/// connection into `keep`, then `n_new` GETs on a new connection each into `fresh`.
pub fn get_loops(
    go: &str,
    n: u64,
    n_new: u64,
    keep: &mut Vec<u64>,
    fresh: &mut Vec<u64>,
) -> Result<u64> {
    let mut it = go.split_whitespace().skip(1);
    let (Some(uri), Some(token_file)) = (it.next(), it.next()) else {
        bail!("bench worker: expected `go <uri> <token file>`, got {go:?}");
    };
    let rest = uri.strip_prefix("http://").ok_or_else(|| anyhow!("not an http URI: {uri}"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: SocketAddr = host.parse().with_context(|| format!("endpoint address {host:?}"))?;
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("bench worker: read {token_file}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {}\r\nAccept: application/json\r\n\r\n",
        token.trim()
    )
    .into_bytes();
    let mut conn = connect(addr)?;
    for i in 0..WARMUP + n {
        let t = Instant::now();
        get(&mut conn, &request).with_context(|| format!("kept-alive GET #{i}"))?;
        if i >= WARMUP {
            keep.push(t.elapsed().as_nanos() as u64);
        }
    }
    drop(conn);
    for i in 0..n_new {
        let t = Instant::now();
        let mut c = connect(addr)?;
        get(&mut c, &request).with_context(|| format!("new-connection GET #{i}"))?;
        fresh.push(t.elapsed().as_nanos() as u64);
        // RST on close: no TIME_WAIT pile-up over a thousand connections.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: a valid socket fd and a correctly sized option value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(c.get_ref()),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
    Ok(n + n_new)
}

fn connect(addr: SocketAddr) -> Result<BufReader<TcpStream>> {
    let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(BufReader::new(s))
}

/// One GET; the answer must be 200 with the credentials' JSON.
fn get(conn: &mut BufReader<TcpStream>, request: &[u8]) -> Result<()> {
    conn.get_mut().write_all(request)?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let status = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut length = None;
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            bail!("closed in the headers");
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = Some(v.trim().parse::<usize>()?);
        }
    }
    let mut body = vec![0; length.ok_or_else(|| anyhow!("no content-length"))?];
    conn.read_exact(&mut body)?;
    if status != "200" || !body.windows(13).any(|w| w == b"\"AccessKeyId\"") {
        bail!("status {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_036_645), "2026-11-30T11:04:05Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
