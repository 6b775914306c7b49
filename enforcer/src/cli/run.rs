//! `enforcer run --intent NAME [--ttl DUR] -- CMD [ARGS...]`: CMD runs holding a grant
//! bound to its own process subtree from its first instruction, the grant is revoked when
//! CMD exits, and CMD's exit status is returned. Signals sent to `enforcer run` are
//! forwarded to CMD. CMD gets `SPIFFE_ENDPOINT_SOCKET=unix://<runtime_dir>/spiffe.sock` when
//! the daemon serves the SPIFFE Workload API.
//!
//! How: fork; the child waits on a pipe; the parent (its ancestor, so allowed to bind it)
//! requests the grant for the child's pid; then releases the child, which execs CMD. The
//! grant lives in the kernel's per-process map, which exec does not clear.
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{self, SigHandler, Signal};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pipe};
use serde_json::json;

use super::grant::call;

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

const FORWARDED: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

pub fn run(intent: &str, ttl: Option<String>, env: &[String], cmd: &[String]) -> Result<ExitCode> {
    if cmd.is_empty() {
        bail!("no command given: enforcer run --intent NAME -- CMD [ARGS...]");
    }
    let secrets = super::run_env::secret_specs(env)?;
    let argv: Vec<CString> = cmd
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("argument contains a NUL byte")?;
    // The job finds the Workload API where SPIFFE libraries look (docs/contracts.md,
    // "Workload identity"); set only when the daemon serves it.
    let spiffe = super::status::socket().with_file_name(crate::spiffe::SOCKET_NAME);
    if spiffe.exists() {
        // SAFETY: no other thread exists yet (see the fork below).
        unsafe {
            std::env::set_var("SPIFFE_ENDPOINT_SOCKET", format!("unix://{}", spiffe.display()))
        };
    }
    let (go_r, go_w) = pipe()?;
    // Fork before any thread exists (the API client's runtime is created per call and dropped).
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(go_w);
            child(go_r, &argv, &secrets)
        }
        ForkResult::Parent { child } => {
            drop(go_r);
            CHILD.store(child.as_raw(), Ordering::SeqCst);
            parent(child, go_w, intent, ttl, &cmd[0])
        }
    }
}

/// Waits for the go byte (and the environment the grant brings), then execs; never returns.
fn child(go: OwnedFd, argv: &[CString], secrets: &[(String, String)]) -> ! {
    let mut b = [0u8; 1];
    let n = unsafe { libc::read(go.as_raw_fd(), b.as_mut_ptr() as *mut libc::c_void, 1) };
    if n != 1 || b[0] != b'g' {
        // The parent could not obtain the grant: never run CMD without it.
        unsafe { libc::_exit(126) };
    }
    // Holding the grant now: set what it brings (AWS endpoint, daemon-held secrets fetched
    // by this very process, which the daemon attests) before CMD starts.
    super::run_env::apply_in_child(go.as_raw_fd(), secrets);
    drop(go);
    let err = nix::unistd::execvp(&argv[0], argv).unwrap_err();
    eprintln!("enforcer run: cannot execute {:?}: {err}", argv[0]);
    unsafe { libc::_exit(if err == nix::errno::Errno::ENOENT { 127 } else { 126 }) }
}

fn parent(
    child: Pid,
    go: OwnedFd,
    intent: &str,
    ttl: Option<String>,
    program: &str,
) -> Result<ExitCode> {
    let mut body = json!({"intent": intent, "pid": child.as_raw()});
    if let Some(t) = ttl {
        body["ttl"] = json!(t);
    }
    let grant = match call("POST", "/v1/grants", Some(body)) {
        Ok(g) => g,
        Err(e) => {
            drop(go); // the child sees EOF and exits without running CMD
            let _ = waitpid(child, None);
            return Err(e.context(format!("no grant for {program}; not started")));
        }
    };
    let id = grant["id"].as_str().unwrap_or_default().to_string();
    eprintln!(
        "enforcer run: grant {id} (intent {intent}) until {}",
        grant["expires_at"].as_str().unwrap_or_default()
    );
    for s in FORWARDED {
        unsafe { signal::signal(s, SigHandler::Handler(forward)) }
            .context("install signal forwarding")?;
    }
    let mut release = b"g".to_vec();
    release.extend(super::run_env::grant_env(&grant));
    nix::unistd::write(&go, &release).context("release the child")?;
    drop(go);
    let status = loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => break ExitCode::from(code as u8),
            Ok(WaitStatus::Signaled(_, sig, _)) => break ExitCode::from(128 + sig as u8),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("waitpid: {e}"),
        }
    };
    // Revoke at exit; if the daemon already ended it (whole subtree exited), that is fine.
    if let Err(e) = call("DELETE", &format!("/v1/grants/{id}"), None) {
        let msg = format!("{e:#}");
        if !msg.contains("not_active") {
            eprintln!("enforcer run: could not revoke grant {id}: {msg}");
        }
    }
    Ok(status)
}
