//! systemd-resolved hosts (issue 15): glibc's nss-resolve asks resolved over its varlink Unix
//! socket and sends no DNS packet, and resolved asks upstream from its own process, so the
//! stub would never see a granted process's lookups. With `[dns] nss_resolve = "fallback"`
//! (the default) a judged process's connect to that socket fails (the IPC hooks'
//! `cgroup/connect_unix` program), nss-resolve answers UNAVAIL and glibc's next source, `dns`,
//! asks port 53: the stub, which learns the answer.
//!
//! Everything runs in a private mount namespace (`unshare -m`), so the host's /etc and /run
//! are untouched: a tmpfs on /run/systemd, and bind-mounted nsswitch.conf (`hosts: files
//! resolve [!UNAVAIL=return] dns`, as Debian's libnss-resolve writes it) and resolv.conf
//! (`nameserver 127.0.0.53`, where nothing listens: a lookup that succeeds without the stub
//! went through resolved's varlink socket).
//! 1. A plain listener at resolved's socket path: a judged process's connect to it fails with
//!    EPERM while an unjudged one's succeeds, and the judged process still resolves (glibc
//!    without the module goes on to `dns`, steered to the stub) and connects.
//! 2. The real thing: systemd-resolved and libnss-resolve of this host's systemd version
//!    (Debian packages fetched by `cargo xtask setup` with `apt-get download` and unpacked
//!    under /var/cache/enforcer-tests, never installed), resolved running as `nobody` with the
//!    namespace's DNS server as its upstream. The unjudged process resolves through resolved;
//!    the granted one falls back to the stub, its answer is learned and its connect carries
//!    `destination.name`. Skipped (with the reason) when setup could not fetch the packages.
use std::path::{Path, PathBuf};
use std::process::Command;

use enforcer_tests::dns_net::{ECHO_PORT, TestNet, connects, has, start};
use enforcer_tests::env::{enforcer_bin, python, root_or_skip};
use enforcer_tests::events::EventExt;

/// Each process prints "<who> varlink ok|EPERM", then "<who> resolved <ip>" and
/// "<who> echo ping", or "<who> error ...".
const CHECK: &str = r#"
import errno, os, socket, sys
who, port = sys.argv[1], int(sys.argv[2])
print(who, "pid", os.getpid(), flush=True)
try:
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.connect("/run/systemd/resolve/io.systemd.Resolve"); u.close()
    print(who, "varlink ok", flush=True)
except OSError as e:
    print(who, "varlink", errno.errorcode.get(e.errno, str(e.errno)), flush=True)
try:
    ip = socket.getaddrinfo("api.dns.test", port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    print(who, "resolved", ip, flush=True)
    s = socket.create_connection((ip, port), timeout=3); s.sendall(b"ping")
    print(who, "echo", s.recv(4).decode(), flush=True)
except OSError as e:
    print(who, "error", e, flush=True)
"#;

/// A Unix stream listener at resolved's socket path that accepts and closes.
const LISTENER: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.bind(sys.argv[1]); s.listen(16)
while True:
    c, _ = s.accept(); c.close()
"#;

/// The namespace's setup, then the unjudged and the granted process. $1: "fake" or "real".
const SCRIPT: &str = r#"
set -e
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -p /run/systemd/resolve /run/systemd/resolved.conf.d
mount --bind "$D/nsswitch.conf" /etc/nsswitch.conf
mount --bind "$D/resolv.conf" /etc/resolv.conf
if [ "$1" = fake ]; then
    "$PY" "$D/listener.py" /run/systemd/resolve/io.systemd.Resolve &
else
    cp "$D/resolved.conf" /run/systemd/resolved.conf.d/test.conf
    chown 65534:65534 /run/systemd/resolve
    # As nobody, its bounding set already down to what it keeps (it drops the rest itself,
    # which an unprivileged process may only do for capabilities it no longer has).
    setpriv --reuid=65534 --regid=65534 --clear-groups --bounding-set=-all,+net_raw \
        "$RESOLVED" 2>"$D/resolved.log" &
    export LD_LIBRARY_PATH="$NSS_LIB"
fi
BG=$!
i=0
while [ ! -S /run/systemd/resolve/io.systemd.Resolve ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
"$PY" -c "$CHECK" unjudged "$PORT" || true
"$ENFORCER" run --intent names -- "$PY" -c "$CHECK" granted "$PORT" || true
kill $BG 2>/dev/null || true
"#;

/// systemd-resolved and libnss-resolve of the installed systemd's version, unpacked (never
/// installed) by `cargo xtask setup` under /var/cache/enforcer-tests: (the resolved binary, the
/// directory holding libnss_resolve.so.2). None, with the reason printed, when setup could not
/// fetch them (not a Debian systemd, or the archive no longer carries that version).
fn resolved_packages() -> Option<(PathBuf, PathBuf)> {
    let out = Command::new("dpkg-query").args(["-W", "-f=${Version}", "systemd"]).output().ok()?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || version.is_empty() {
        eprintln!("SKIP part 2: systemd is not a Debian package here");
        return None;
    }
    let dir = PathBuf::from(format!("/var/cache/enforcer-tests/resolved-{version}"));
    if !dir.join(".complete").exists() {
        eprintln!(
            "SKIP part 2: {} is missing: `CI=1 cargo xtask setup` fetches systemd-resolved={version} and libnss-resolve={version} (see its output for why it could not)",
            dir.display()
        );
        return None;
    }
    // The binary is in lib/systemd (bookworm) or usr/lib/systemd (merged /usr).
    let find = |pattern: &str| -> Option<PathBuf> {
        let out = Command::new("find").arg(&dir).args(["-path", pattern, "-type", "f"]).output();
        let path = String::from_utf8_lossy(&out.ok()?.stdout).lines().next()?.to_string();
        Some(PathBuf::from(path))
    };
    let lib = find("*/libnss_resolve.so.2").and_then(|l| Some(l.parent()?.to_path_buf()));
    match (find("*/lib/systemd/systemd-resolved"), lib) {
        (Some(bin), Some(lib)) => Some((bin, lib)),
        _ => {
            eprintln!("SKIP part 2: {} lacks systemd-resolved or libnss_resolve", dir.display());
            None
        }
    }
}

/// Runs SCRIPT in a new mount namespace inside the test cgroup: the output lines.
fn run_in_namespace(
    cg: &enforcer_tests::cgroup::TestCgroup,
    runtime_dir: &Path,
    files: &Path,
    mode: &str,
    packages: Option<&(PathBuf, PathBuf)>,
) -> Vec<String> {
    let mut c = cg.command("unshare");
    c.args(["-m", "--propagation", "private", "sh", "-c", SCRIPT, "sh", mode])
        .env("D", files)
        .env("PY", python())
        .env("CHECK", CHECK)
        .env("PORT", ECHO_PORT.to_string())
        .env("ENFORCER", enforcer_bin())
        .env("ENFORCER_RUNTIME_DIR", runtime_dir);
    if let Some((bin, lib)) = packages {
        c.env("RESOLVED", bin).env("NSS_LIB", lib);
    }
    let out = c.output().expect("unshare");
    let lines: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert!(
        out.status.success(),
        "{mode}: {lines:?}\n{}\nresolved: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(files.join("resolved.log")).unwrap_or_default()
    );
    lines
}

fn pid_of(lines: &[String], who: &str) -> u32 {
    let prefix = format!("{who} pid ");
    lines.iter().find_map(|l| l.strip_prefix(&prefix)?.parse().ok()).expect("pid line")
}

#[test]
fn nss_resolve_falls_back_to_the_stub() {
    if !root_or_skip("nss_resolve_falls_back_to_the_stub") {
        return;
    }
    let net = TestNet::create();
    let (cg, daemon) = start("dns-nss", "enforce", &net, "");
    let st = daemon.status_json();
    if st["dns"]["nss_resolve"] != "fallback" {
        // Only the cgroup/connect_unix hook (Linux 6.7+) can fail the connect.
        eprintln!("SKIP: nss_resolve fallback not in force here: {}", st["dns"]["nss_resolve"]);
        assert!(st["dns"]["nss_resolve"].as_str().unwrap().contains("unavailable"), "{st:#}");
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let f = |name: &str, text: String| std::fs::write(files.path().join(name), text).unwrap();
    f("nsswitch.conf", "hosts: files resolve [!UNAVAIL=return] dns\n".into());
    f("resolv.conf", "nameserver 127.0.0.53\noptions timeout:1 attempts:1\n".into());
    f("listener.py", LISTENER.into());
    f(
        "resolved.conf",
        format!(
            "[Resolve]\nDNS={}\nDomains=~.\nLLMNR=no\nMulticastDNS=no\nDNSSEC=no\nDNSOverTLS=no\nCache=no\nDNSStubListener=no\nReadEtcHosts=no\n",
            net.addr(2)
        ),
    );
    let a10 = net.addr(10);

    // 1. The mechanism, with a plain listener at the path.
    let lines = run_in_namespace(&cg, &daemon.runtime_dir(), files.path(), "fake", None);
    for want in [
        "unjudged varlink ok".to_string(),
        "granted varlink EPERM".to_string(),
        format!("granted resolved {a10}"),
        "granted echo ping".to_string(),
    ] {
        assert!(has(&lines, &want), "missing {want:?} in {lines:#?}\n{}", daemon.log());
    }
    // Nothing answers 127.0.0.53 without the stub: the unjudged lookup fails.
    assert!(lines.iter().any(|l| l.starts_with("unjudged error")), "{lines:#?}");

    // 2. Real systemd-resolved and nss-resolve.
    let Some(packages) = resolved_packages() else { return };
    let lines = run_in_namespace(&cg, &daemon.runtime_dir(), files.path(), "real", Some(&packages));
    for want in [
        "unjudged varlink ok".to_string(),
        format!("unjudged resolved {a10}"),
        "unjudged echo ping".to_string(),
        "granted varlink EPERM".to_string(),
        format!("granted resolved {a10}"),
        "granted echo ping".to_string(),
    ] {
        assert!(has(&lines, &want), "missing {want:?} in {lines:#?}\n{}", daemon.log());
    }
    // The granted process's address was learned from its query through the stub.
    let pid = pid_of(&lines, "granted");
    let c = connects(&daemon, pid, a10.clone());
    assert_eq!(
        (c[0].verdict.as_str(), c[0].dest().name.as_deref()),
        ("allowed", Some("api.dns.test")),
        "{c:#?}"
    );
    // resolved asked the namespace's server too (the unjudged lookup went through it).
    let seen = net.queries();
    assert!(seen.iter().filter(|l| l.starts_with("api.dns.test 1 ")).count() >= 2, "{seen:?}");
    daemon.assert_no_decision_mismatches();
}
