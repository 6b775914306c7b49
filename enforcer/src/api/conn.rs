//! One API connection under the daemon's bounds: a cap on open connections, in all and per
//! non-root uid (past it a new one gets a 503 JSON line and is closed at once), an idle timeout (no request in progress
//! and no byte received for `limits.api_idle_timeout_seconds`), and a 60 s lifetime cap.
//! Each connection holds two fds (the socket and the peer's pidfd), so the cap bounds the
//! daemon's fds whatever clients do.
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// Longest any connection lives.
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);

/// Connection counters for the status document and metrics.
#[derive(Default)]
pub struct ConnStats {
    /// Open connections per peer uid (non-root), for `limits.api_max_connections_per_uid`.
    per_uid: std::sync::Mutex<std::collections::HashMap<u32, u64>>,
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    /// Closed at accept: the cap was reached.
    pub refused: AtomicU64,
    /// Closed for idleness (or the lifetime cap), or without sending a request in time.
    pub idle_closed: AtomicU64,
}

impl ConnStats {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "open": self.open.load(Ordering::Relaxed),
            "accepted": self.accepted.load(Ordering::Relaxed),
            "refused": self.refused.load(Ordering::Relaxed),
            "idle_closed": self.idle_closed.load(Ordering::Relaxed),
        })
    }
}

/// Holds one of the open-connection slots (and one of its uid's); released on drop.
pub struct Slot(Arc<ConnStats>, Option<u32>);

impl Slot {
    /// A slot if fewer than `max` connections are open and, for a non-root `uid`, fewer than
    /// `per_uid` of that uid's (one local user cannot take every slot).
    pub fn take(stats: &Arc<ConnStats>, max: u64, uid: Option<u32>, per_uid: u64) -> Option<Slot> {
        let uid = uid.filter(|u| *u != 0);
        if let Some(u) = uid {
            let mut m = stats.per_uid.lock().unwrap_or_else(|e| e.into_inner());
            let n = m.entry(u).or_default();
            if *n >= per_uid {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            *n += 1;
        }
        let slot = Slot(stats.clone(), uid);
        let prev = stats.open.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            return None; // the drop gives both back
        }
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        Some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(u) = self.1 {
            let mut m = self.0.per_uid.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(&u) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&u);
                }
            }
        }
    }
}

/// Tells the refused client why, without waiting on it: one non-blocking write, then close.
pub fn refuse(stream: UnixStream) {
    let body = br#"{"error":{"code":"too_many_connections","message":"the API connection limit (limits.api_max_connections) is reached; retry later"}}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n",
        body.len() + 1
    );
    let mut msg = head.into_bytes();
    msg.extend_from_slice(body);
    msg.push(b'\n');
    let _ = stream.try_write(&msg);
}

/// Activity of a connection: when a byte was last read, and requests in progress.
#[derive(Default)]
pub struct Activity {
    /// Milliseconds since `epoch` of the last read.
    last_read_ms: AtomicU64,
    pub in_flight: AtomicU64,
    /// Requests started on this connection.
    pub requests: AtomicU64,
    /// With `mint::timing` on: CLOCK_MONOTONIC ns of the last read that brought bytes, and
    /// of the last write (the previous answer leaving), for the request's stamps.
    pub last_read_ns: AtomicU64,
    pub last_write_ns: AtomicU64,
}

/// A request in progress; the connection is not idle while one exists.
pub struct InFlight(Arc<Activity>);

impl InFlight {
    pub fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        a.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The stream, noting each read in `Activity`.
pub struct Tracked {
    pub inner: UnixStream,
    pub activity: Arc<Activity>,
    pub epoch: Instant,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let ms = self.epoch.elapsed().as_millis() as u64;
            self.activity.last_read_ms.store(ms, Ordering::Relaxed);
            if crate::mint::timing::enabled() {
                let ns = crate::mint::timing::now_ns();
                self.activity.last_read_ns.store(ns, Ordering::Relaxed);
            }
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if crate::mint::timing::enabled() && matches!(r, Poll::Ready(Ok(_))) {
            let ns = crate::mint::timing::now_ns();
            self.activity.last_write_ns.store(ns, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Drives `conn` until it ends, goes idle for `idle`, or reaches MAX_LIFETIME; then drops it
/// (closing the socket). Counts closes for idleness.
pub async fn drive<F: std::future::Future>(
    conn: F,
    activity: Arc<Activity>,
    epoch: Instant,
    idle: Duration,
    stats: &ConnStats,
) {
    tokio::pin!(conn);
    let end = epoch + MAX_LIFETIME;
    loop {
        let now = Instant::now();
        let last = Duration::from_millis(activity.last_read_ms.load(Ordering::Relaxed));
        let busy = activity.in_flight.load(Ordering::Acquire) > 0;
        let idle_at = epoch + last + idle;
        if now >= end || (!busy && now >= idle_at) {
            stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // A request being answered keeps the connection: look again shortly.
        let wake = if now >= idle_at { now + Duration::from_millis(100) } else { idle_at };
        tokio::select! {
            _ = &mut conn => {
                // Ended without a single request: hyper's header timeout closed a silent client.
                if activity.requests.load(Ordering::Relaxed) == 0 {
                    stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            _ = tokio::time::sleep_until(wake.min(end).into()) => {}
        }
    }
}

/// The pidfd a client attached (SCM_RIGHTS) to the first bytes of its request, peeked without
/// consuming them (Linux duplicates passed fds on MSG_PEEK; the later plain read discards the
/// originals). `grant request --pid` sends the target's pidfd this way, so the daemon binds
/// the very process the CLI pinned. None if nothing, or anything but exactly one fd, came.
pub async fn peek_pidfd(stream: &UnixStream, wait: Duration) -> Option<std::os::fd::OwnedFd> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        tokio::time::timeout_at(deadline, stream.readable()).await.ok()?.ok()?;
        // A readiness that turns out stale (no byte yet) is cleared and waited for again.
        match stream.try_io(tokio::io::Interest::READABLE, || peek_fds(stream)) {
            Ok(fd) => return fd,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
    }
}

/// Peeks at the first byte and takes the fds passed with it: exactly one, or none.
fn peek_fds(stream: &UnixStream) -> io::Result<Option<std::os::fd::OwnedFd>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut cmsg), flags)
        .map_err(io::Error::from)?;
    if msg.bytes == 0 {
        return Ok(None); // the client closed without sending
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(v) = c {
            // SAFETY: fds the kernel just installed for us; nobody else owns them.
            fds.extend(v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    Ok(if fds.len() == 1 { fds.pop() } else { None })
}
