//! Who is calling, as the kernel says (docs/threat-model.md, "Trust boundaries": never what the
//! caller claims).
//!
//! The identity is pinned by a pidfd taken before /proc is read; after reading, the pidfd must
//! still refer to a live process. A live process keeps its pid, so everything read from
//! /proc/<pid> in between described that process and not a successor that reused the pid.

use std::cell::OnceCell;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::error::MintError;
use super::model::Subject;
use super::procdir::{self, ExeKey, ProcDir};
use crate::policy::Intent;

/// Executables larger than this are not hashed (`limits.exe_hash_max_bytes`, set by the
/// daemon at start and reload): a sparse 2 TiB binary must not hold a mint thread for hours.
static EXE_HASH_MAX: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(crate::policy::Limits::DEFAULT_EXE_HASH_MAX_BYTES);

pub fn set_exe_hash_max(bytes: u64) {
    EXE_HASH_MAX.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// Parent-chain walks stop here: deeper trees are refused rather than walked without bound.
const MAX_ANCESTRY: usize = 64;

/// A process attested by the kernel. `pidfd` keeps its identity: while it reports the process
/// alive, `pid` still names it.
#[derive(Debug)]
pub struct Requester {
    pub pid: u32,
    /// /proc/<pid>/stat starttime converted to ns since boot. Tick-granular (usually 10 ms):
    /// compare with kernel-side ns values only after truncating those to ticks.
    pub start_ns: u64,
    /// readlink of /proc/<pid>/exe, kept verbatim: a replaced binary reads "... (deleted)" and
    /// then matches no `exe` selector, which fails closed.
    pub exe: String,
    /// Effective ids (what SO_PEERCRED reports).
    pub uid: u32,
    pub gid: u32,
    /// The cgroup v2 path (`0::` line of /proc/<pid>/cgroup); empty on a v1-only host.
    pub cgroup: String,
    pub pidfd: OwnedFd,
    /// The executable's identity (dev, ino, size, mtime) read during attestation, for the
    /// exe hash cache; None if it could not be read (then it is read again when needed).
    pub exe_key: Option<ExeKey>,
}

impl Requester {
    /// SHA-256 (lower-case hex) of the file the process actually runs: /proc/<pid>/exe opens the
    /// mapped file even if its path was since replaced or deleted. Streams the file; can take a
    /// while on large binaries, so call it from a blocking context.
    pub fn exe_sha256(&self) -> io::Result<String> {
        let mut f = File::open(format!("/proc/{}/exe", self.pid))?;
        let md = f.metadata()?;
        let max = EXE_HASH_MAX.load(std::sync::atomic::Ordering::Relaxed);
        if !md.is_file() || md.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "executable of {} bytes not hashed (limits.exe_hash_max_bytes is {max})",
                    md.len()
                ),
            ));
        }
        // The open must have reached this process's image: still alive (so the pid is still its)
        // and not re-exec'd since attestation.
        let now = read_exe(self.pid)?;
        if exited(&self.pidfd) || now != self.exe {
            return Err(io::Error::new(io::ErrorKind::NotFound, "process exited or exec'd"));
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) if total + n as u64 > max => {
                    return Err(io::Error::new(io::ErrorKind::FileTooLarge, "executable grew"));
                }
                Ok(n) => {
                    total += n as u64;
                    hasher.update(&buf[..n])
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(hex::encode(hasher.finalize()))
    }

    pub fn subject(&self, exe_sha256: String) -> Subject {
        Subject {
            pid: self.pid,
            start_ns: self.start_ns,
            exe: self.exe.clone(),
            exe_sha256,
            uid: self.uid,
            gid: self.gid,
            cgroup: self.cgroup.clone(),
        }
    }

    /// Whether the process has exited (or the check itself failed: fail closed).
    pub fn is_gone(&self) -> bool {
        exited(&self.pidfd)
    }
}

/// The peer of a mint-socket connection.
pub fn attest_peer(stream: &tokio::net::UnixStream) -> Result<Requester, MintError> {
    let cred = stream
        .peer_cred()
        .map_err(|e| MintError::AttestationFailed(format!("SO_PEERCRED: {e}")))?;
    let pid = cred.pid().filter(|p| *p > 0).ok_or_else(|| {
        MintError::AttestationFailed("peer has no pid in this pid namespace".into())
    })? as u32;
    // SO_PEERPIDFD (Linux 6.5+) names the process that connected, with no window for pid reuse.
    // Older kernels: pidfd_open on the pid, which leaves the window between connect and here.
    let pidfd = match peer_pidfd(stream.as_raw_fd()) {
        Some(fd) => fd,
        None => pidfd_open(pid).map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) => gone(pid),
            _ => MintError::AttestationFailed(format!("pidfd_open({pid}): {e}")),
        })?,
    };
    attest(pid, pidfd, Some((cred.uid(), cred.gid())))
}

/// A target process named with `--pid`; ids come from /proc/<pid>/status.
pub fn attest_pid(pid: u32) -> Result<Requester, MintError> {
    if pid == 0 || pid > i32::MAX as u32 {
        return Err(MintError::InvalidPid(format!("invalid pid {pid}")));
    }
    let pidfd = pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => MintError::NoSuchProcess(format!("no process {pid}")),
        Some(libc::EINVAL) => MintError::InvalidPid(format!(
            "pid {pid} is a thread, not a process (give its thread-group id)"
        )),
        _ => MintError::AttestationFailed(format!("pidfd_open({pid}): {e}")),
    })?;
    attest(pid, pidfd, None)
}

/// A target process named with `--pid` whose pidfd the requester sent (SCM_RIGHTS): the pidfd
/// was taken by the requester when it named the process, so it can only refer to that
/// process; if it has exited meanwhile the request is refused, whatever holds the pid now.
pub fn attest_sent_pidfd(pid: u32, pidfd: OwnedFd) -> Result<Requester, MintError> {
    match pidfd_pid(&pidfd) {
        Some(p) if p == pid as i64 => {}
        Some(-1) | None if exited(&pidfd) => {
            return Err(MintError::SubjectGone(format!(
                "process {pid} named by the request (pinned by the pidfd it sent) exited; the \
                 pid may belong to another process now, which is not bound"
            )));
        }
        other => {
            return Err(MintError::InvalidPid(format!(
                "the pidfd sent with the request names process {}, not pid {pid}",
                other.map_or("unknown".to_string(), |p| p.to_string())
            )));
        }
    }
    if exited(&pidfd) {
        return Err(MintError::SubjectGone(format!(
            "process {pid} named by the request (pinned by the pidfd it sent) exited; the pid \
             may belong to another process now, which is not bound"
        )));
    }
    attest(pid, pidfd, None)
}

/// The pid a pidfd refers to (`Pid:` of its fdinfo; -1 once the process is reaped), or None
/// if `fd` is not a pidfd.
pub fn pidfd_pid(fd: &OwnedFd) -> Option<i64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    // A pidfd's fdinfo has a `Pid:` line (and no `pos:`-only shape); other fds have none.
    info.lines().find_map(|l| l.strip_prefix("Pid:")).and_then(|v| v.trim().parse().ok())
}

fn attest(pid: u32, pidfd: OwnedFd, ids: Option<(u32, u32)>) -> Result<Requester, MintError> {
    // The reads, and whether they proved on their own that the process was alive after
    // every one of them (see `pinned` below).
    type Facts = (String, Option<ExeKey>, u64, u32, u32, String, bool);
    let read = || -> io::Result<Facts> {
        let dir = ProcDir::open(pid)?;
        let exe = dir.readlink(c"exe")?;
        let exe_key = dir.exe_key(c"exe").ok();
        let stat = dir.read(c"stat")?;
        let start_ns = ticks_to_ns(stat_start_ticks(&stat).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/<pid>/stat")
        })?);
        // The kernel's record through the pidfd (Linux 6.13+): ids and cgroup id. It fails
        // with ESRCH once the process is reaped, and a pid is only given to another process
        // after that: an answer proves that the directory, opened after the pidfd, is the
        // pinned process's.
        let info = match procdir::pidfd_info(&pidfd) {
            Ok(i) => Some(i),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(e),
            Err(_) => None,
        };
        let (uid, gid) = match ids.or(info.map(|i| (i.euid, i.egid))) {
            Some(ids) => ids,
            None => {
                let status = dir.read(c"status")?;
                (status_field(&status, "Uid:")?, status_field(&status, "Gid:")?)
            }
        };
        let read_cgroup = || -> io::Result<String> {
            Ok(dir
                .read(c"cgroup")?
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or_default()
                .to_string())
        };
        let cgroup = match info.and_then(|i| i.cgroupid) {
            Some(id) => procdir::cgroup_path(id, read_cgroup)?,
            None => read_cgroup()?,
        };
        // An exec between the first readlink and here would mix two images' facts. The link
        // reads only while the process has its memory (it fails from the start of its exit
        // on): after the pidfd's answer, this last read also proves the process alive.
        if dir.readlink(c"exe")? != exe {
            return Err(io::Error::new(io::ErrorKind::NotFound, "exec during attestation"));
        }
        let pinned = info.is_some();
        Ok((exe, exe_key, start_ns, uid, gid, cgroup, pinned))
    };
    let result = read();
    // Last, after every read: only a still-live process proves the reads were about it
    // (already proven when the pidfd answered and the last readlink succeeded).
    if !result.as_ref().is_ok_and(|r| r.6) && exited(&pidfd) {
        return Err(gone(pid));
    }
    let (exe, exe_key, start_ns, uid, gid, cgroup, _) = result.map_err(|e| match e.kind() {
        // ESRCH: the directory handle outlived its process.
        io::ErrorKind::NotFound => gone(pid),
        _ if e.raw_os_error() == Some(libc::ESRCH) => gone(pid),
        _ => MintError::AttestationFailed(format!("reading /proc/{pid}: {e}")),
    })?;
    Ok(Requester { pid, start_ns, exe, uid, gid, cgroup, pidfd, exe_key })
}

fn gone(pid: u32) -> MintError {
    MintError::SubjectGone(format!(
        "process {pid} exited or was replaced while it was being identified"
    ))
}

/// Whether `caller` may have a grant bound to `target`: root may bind anything, others only
/// themselves or their descendants.
pub fn may_bind(caller: &Requester, target: &Requester) -> Result<(), MintError> {
    may_bind_as(caller.uid, caller, target)
}

/// `may_bind` with the caller's uid given explicitly, so tests running as root can exercise the
/// descendant walk.
fn may_bind_as(uid: u32, caller: &Requester, target: &Requester) -> Result<(), MintError> {
    if uid == 0 {
        return Ok(());
    }
    let ok = is_descendant(caller.pid, caller.start_ns, target.pid);
    // The walk read /proc/<target.pid>: only valid if that is still the attested target.
    if target.is_gone() {
        return Err(gone(target.pid));
    }
    if ok {
        Ok(())
    } else {
        Err(MintError::NotYourProcess(format!(
            "process {} is not a descendant of the caller (pid {}, uid {uid}); only root may bind grants to other processes",
            target.pid, caller.pid
        )))
    }
}

/// Walks PPid upwards from `pid` (itself included) looking for `ancestor`; the ancestor's start
/// time must match so a reused ancestor pid does not count.
pub(crate) fn is_descendant(ancestor: u32, ancestor_start_ns: u64, pid: u32) -> bool {
    let mut cur = pid;
    for _ in 0..=MAX_ANCESTRY {
        if cur == ancestor {
            return read_start_ns(cur).is_ok_and(|s| s == ancestor_start_ns);
        }
        match status_id(cur, "PPid:") {
            // 0: no parent visible in this pid namespace.
            Ok(p) if p != 0 => cur = p,
            _ => return false,
        }
    }
    false
}

/// Whether one of the intent's agent selectors matches `r`. The exe hash is only computed if a
/// selector asks for it, and at most once. Messages name what did not match, never secrets.
pub fn selector_allows(intent: &Intent, r: &Requester) -> Result<(), MintError> {
    selector_allows_with(intent, r, || r.exe_sha256().ok())
}

/// `selector_allows` with the exe hash from `exe_sha256` (a cache), asked for at most once.
pub fn selector_allows_with(
    intent: &Intent,
    r: &Requester,
    exe_sha256: impl Fn() -> Option<String>,
) -> Result<(), MintError> {
    if intent.agents.is_empty() {
        return Err(MintError::NoAgents(format!(
            "intent {} names no agents; nobody may request it",
            intent.name
        )));
    }
    let sha: OnceCell<Option<String>> = OnceCell::new();
    let exe = Path::new(&r.exe);
    if intent
        .agents
        .iter()
        .any(|a| a.matches(exe, r.uid, &r.cgroup, || sha.get_or_init(&exe_sha256).clone()))
    {
        return Ok(());
    }
    let hash = match sha.get() {
        None => String::new(),
        Some(None) => ", exe sha256 unavailable".into(),
        Some(Some(h)) => format!(", exe sha256 {h}"),
    };
    Err(MintError::AgentNotAllowed(format!(
        "intent {}: process {} matches none of its {} agent selector(s) (exe {}, uid {}, cgroup {}{hash})",
        intent.name,
        r.pid,
        intent.agents.len(),
        r.exe,
        r.uid,
        if r.cgroup.is_empty() { "unknown" } else { &r.cgroup },
    )))
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; the fd it returns (close-on-exec) is ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// SO_PEERPIDFD, or None when the kernel lacks it (then fall back to pidfd_open).
fn peer_pidfd(sock: RawFd) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd/len point to a c_int and its size, as the option expects.
    let rc = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // SAFETY: on success the kernel installed a new close-on-exec fd that we now own.
    (rc == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd polls readable once its process has exited (zombie included). Errors count as
/// exited: attestation fails closed.
fn exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return n != 0;
    }
}

fn read_exe(pid: u32) -> io::Result<String> {
    Ok(std::fs::read_link(format!("/proc/{pid}/exe"))?.to_string_lossy().into_owned())
}

fn read_start_ns(pid: u32) -> io::Result<u64> {
    Ok(ticks_to_ns(read_start_ticks(pid)?))
}

/// /proc/<pid>/stat field 22: when the process started, in clock ticks since boot.
fn read_start_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat_start_ticks(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/<pid>/stat"))
}

fn ticks_to_ns(ticks: u64) -> u64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u128 } else { 100 };
    (ticks as u128 * 1_000_000_000 / hz).min(u64::MAX as u128) as u64
}

/// Pins the process `pid` for a request that names it (`grant request --pid`): a pidfd taken
/// first, then its start time (clock ticks), read while the pidfd still shows it alive, so
/// the start time is that process's and not a successor's.
pub fn pin_target(pid: u32) -> Result<(OwnedFd, u64), MintError> {
    if pid == 0 || pid > i32::MAX as u32 {
        return Err(MintError::InvalidPid(format!("invalid pid {pid}")));
    }
    let pidfd = pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => MintError::NoSuchProcess(format!("no process {pid}")),
        _ => MintError::AttestationFailed(format!("pidfd_open({pid}): {e}")),
    })?;
    let ticks = read_start_ticks(pid);
    if exited(&pidfd) {
        return Err(MintError::SubjectGone(format!("process {pid} exited")));
    }
    let ticks =
        ticks.map_err(|e| MintError::AttestationFailed(format!("/proc/{pid}/stat: {e}")))?;
    Ok((pidfd, ticks))
}

/// The request named `target.pid` as the process that started at `ticks`: a different start
/// time means that process exited and the pid now belongs to another one, which must never
/// receive the grant.
pub fn check_start_time(target: &Requester, ticks: u64) -> Result<(), MintError> {
    if target.start_ns == ticks_to_ns(ticks) {
        return Ok(());
    }
    Err(MintError::SubjectGone(format!(
        "process {} named by the request (start time {ticks} ticks) exited; pid {} now belongs          to another process, which is not bound",
        target.pid, target.pid
    )))
}

/// Field 22 (starttime, in clock ticks). comm (field 2) may hold spaces and parentheses, so
/// fields are counted from after the LAST ')': there field 3 (state) is the first.
fn stat_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

/// The effective id (second column) of `Uid:`/`Gid:`, or the single value of `PPid:`.
fn status_id(pid: u32, key: &str) -> io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status_field(&status, key)
}

fn status_field(status: &str, key: &str) -> io::Result<u32> {
    let col = if key == "PPid:" { 0 } else { 1 };
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().nth(col)?.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no {key} in status")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::AgentSelector;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    fn me() -> Requester {
        attest_pid(std::process::id()).unwrap()
    }

    fn sleeper() -> std::process::Child {
        Command::new("sleep").arg("30").stdin(Stdio::null()).spawn().unwrap()
    }

    #[tokio::test]
    async fn attests_peer_over_socket() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let r = attest_peer(&a).unwrap();
        assert_eq!(r.pid, std::process::id());
        let exe = std::env::current_exe().unwrap();
        assert_eq!(Path::new(&r.exe), exe);
        assert_eq!(r.uid, unsafe { libc::geteuid() });
        assert_eq!(r.gid, unsafe { libc::getegid() });
        assert!(r.start_ns > 0);
        let again = attest_peer(&a).unwrap();
        assert_eq!(again.start_ns, r.start_ns);
        // attest_pid sees the same process.
        let by_pid = me();
        assert_eq!(
            (by_pid.start_ns, by_pid.exe.as_str(), by_pid.cgroup.as_str()),
            (r.start_ns, r.exe.as_str(), r.cgroup.as_str())
        );
    }

    /// On a small binary (`sleep`): the test binary is large and sha2 is slow unoptimised.
    #[test]
    fn hashes_running_binary() {
        let mut c = sleeper();
        let r = attest_pid(c.id()).unwrap();
        let h = r.exe_sha256().unwrap();
        assert_eq!(h, hex::encode(Sha256::digest(std::fs::read(&r.exe).unwrap())));
        let s = r.subject(h.clone());
        assert_eq!((s.pid, s.start_ns, s.exe_sha256, s.exe), (r.pid, r.start_ns, h, r.exe.clone()));
        c.kill().unwrap();
        c.wait().unwrap();
    }

    #[test]
    fn exited_child_is_refused() {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        // Zombie (exited, not yet reaped): the pidfd opens but polls readable.
        let t = Instant::now();
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
        {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(attest_pid(pid).unwrap_err(), MintError::SubjectGone(_)));
        c.wait().unwrap();
        // Reaped: no such process (unless the pid was reused, which would then be a new one).
        if let Err(e) = attest_pid(pid) {
            assert!(matches!(e, MintError::NoSuchProcess(_)), "{e:?}");
        }
        let mut c = sleeper();
        let r = attest_pid(c.id()).unwrap();
        assert!(!r.is_gone());
        c.kill().unwrap();
        c.wait().unwrap();
        assert!(r.is_gone());
        assert!(r.exe_sha256().is_err());
    }

    #[test]
    fn bad_pids() {
        assert!(matches!(attest_pid(0).unwrap_err(), MintError::InvalidPid(_)));
        assert!(matches!(attest_pid(u32::MAX).unwrap_err(), MintError::InvalidPid(_)));
    }

    #[test]
    fn descendant_walk() {
        let mut c = sleeper();
        let me = me();
        let child = attest_pid(c.id()).unwrap();
        // As a non-root caller: own child and self are bindable, the parent is not.
        assert!(may_bind_as(1000, &me, &child).is_ok());
        assert!(may_bind_as(1000, &me, &me).is_ok());
        assert!(matches!(
            may_bind_as(1000, &child, &me).unwrap_err(),
            MintError::NotYourProcess(_)
        ));
        // Unrelated processes (init, our own parent) are not descendants. (Walked directly:
        // /proc/1/exe may be unreadable even to root in a container.)
        assert!(!is_descendant(me.pid, me.start_ns, 1));
        assert!(!is_descendant(me.pid, me.start_ns, std::os::unix::process::parent_id()));
        assert!(is_descendant(me.pid, me.start_ns, child.pid));
        // A caller whose pid matches but whose start time does not is a different process.
        let stale = Requester {
            start_ns: me.start_ns + 1,
            pidfd: me.pidfd.try_clone().unwrap(),
            exe: me.exe.clone(),
            cgroup: me.cgroup.clone(),
            ..me
        };
        assert!(may_bind_as(1000, &stale, &child).is_err());
        // Root binds anything.
        assert!(may_bind_as(0, &child, &me).is_ok());
        c.kill().unwrap();
        c.wait().unwrap();
        assert!(matches!(may_bind_as(1000, &me, &child).unwrap_err(), MintError::SubjectGone(_)));
    }

    #[test]
    fn stat_parsing() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21";
        assert_eq!(stat_start_ticks(&format!("42 (sleep) {tail}")), Some(987654));
        assert_eq!(stat_start_ticks(&format!("42 (a) (b) 1 2 ) {tail}")), Some(987654));
        assert_eq!(stat_start_ticks(&format!("42 ( ) {tail}\n")), Some(987654));
        assert_eq!(stat_start_ticks("42 (x) S 1 2"), None);
        assert_eq!(stat_start_ticks("garbage"), None);
    }

    fn intent(agents: Vec<AgentSelector>) -> Intent {
        Intent {
            name: "deploy".into(),
            agents,
            secrets: vec![],
            destinations: vec![],
            max_ttl: Duration::from_secs(900),
            default_ttl: Duration::from_secs(300),
            on_violation: Default::default(),
            revoke_on_violation: false,
            aws: None,
            audiences: vec![],
            spiffe_id: None,
        }
    }

    #[test]
    fn selectors() {
        let mut c = sleeper();
        let r = attest_pid(c.id()).unwrap();
        let e = selector_allows(&intent(vec![]), &r).unwrap_err();
        assert_eq!(
            e,
            MintError::NoAgents("intent deploy names no agents; nobody may request it".into())
        );
        let by_exe = AgentSelector { exe: Some(r.exe.clone().into()), ..Default::default() };
        assert!(selector_allows(&intent(vec![by_exe]), &r).is_ok());
        let other = AgentSelector {
            exe: Some("/usr/bin/nope".into()),
            uid: Some(r.uid),
            ..Default::default()
        };
        let e = selector_allows(&intent(vec![other.clone()]), &r).unwrap_err();
        assert!(matches!(e, MintError::AgentNotAllowed(_)), "{e:?}");
        assert!(e.to_string().contains(&r.exe) && e.to_string().contains("deploy"), "{e}");
        assert!(!e.to_string().contains("sha256"), "hash computed needlessly: {e}");
        let by_hash = AgentSelector {
            exe_sha256: Some(r.exe_sha256().unwrap().to_uppercase()),
            ..Default::default()
        };
        assert!(selector_allows(&intent(vec![other, by_hash]), &r).is_ok());
        let wrong_hash = AgentSelector { exe_sha256: Some("00".repeat(32)), ..Default::default() };
        let e = selector_allows(&intent(vec![wrong_hash]), &r).unwrap_err();
        assert!(e.to_string().contains("exe sha256"), "{e}");
        c.kill().unwrap();
        c.wait().unwrap();
    }
}
