use std::process::ExitCode;

use serde_json::json;

use crate::kernel::probe::{self, Probe};

/// What this host supports, by real loads, and which backend each hook uses.
pub fn run(json_out: bool) -> anyhow::Result<ExitCode> {
    let probes = probe::run_all();
    let ok = |name: &str| probes.iter().any(|p| p.name.starts_with(name) && p.ok);
    let required = [
        "raw_tracepoint",
        "cgroup_sock_addr",
        "cgroup_sock/sock_create",
        "map creation",
        "fanotify",
    ];
    let missing: Vec<&str> = required.iter().copied().filter(|r| !ok(r)).collect();
    let lsm = ok("lsm/file_open");
    let exact = |name: &str| probes.iter().any(|p| p.name == name && p.ok);
    let backends = json!({
        "process_lineage": if ok("raw_tracepoint") { "raw_tracepoint (pinned links)" } else { "unavailable" },
        "connect": if ok("cgroup_sock_addr") { "cgroup_sock_addr (in-kernel, inline)" } else { "unavailable" },
        "socket_create": if ok("cgroup_sock/sock_create") { "cgroup_sock sock_create (in-kernel, AF_INET/AF_INET6)" } else { "unavailable" },
        "file_open": if lsm { "bpf-lsm (lsm/file_open, decided in the kernel; with file_backend = \"auto\" or \"bpf-lsm\")" } else if ok("fanotify") { "fanotify (FAN_OPEN_PERM, decided by the daemon)" } else { "unavailable" },
        "egress": if exact("cgroup_skb/egress") { "cgroup_skb egress (judges the writer and the socket's owner)" } else if exact("cgroup_skb/egress_owner") { "cgroup_skb egress_owner (this kernel refuses the current task in cgroup_skb: judges the socket's judged creator and the taint it carried)" } else { "unavailable" },
        "ipc": if ok("ipc cgroup_sock_addr") { "cgroup_sock_addr connect_unix + sendmsg_unix (only Unix connects and addressed sends in cgroup_root)" } else if ok("ipc lsm") { "lsm unix_stream_connect + unix_may_send" } else { "syscall tracepoints sys_enter_connect + sys_enter_sendto (last resort: every system call on the host takes the tracing path while the daemon runs)" },
        "file_open_note": if lsm { "fails closed: with no daemon the pinned program keeps judging secret opens (grants, expiry, deny, taint); fails open only for a new inode at a secret path whose file name is 64 bytes or longer".to_string() } else { format!("BPF-LSM refused by this kernel (see lsm/file_open above; {}); fanotify is the fallback, and it fails open: with no daemon, opens of secrets are allowed unrecorded", lsm_hint()) },
    });
    // Destinations by name: what this host's resolution means for the DNS stub.
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let resolved_active = std::path::Path::new(crate::dns::RESOLVED_VARLINK).exists();
    // The default `[dns] nss_resolve = "fallback"` needs the cgroup connect_unix hook.
    let fallback = ok("ipc cgroup_sock_addr");
    let dns_notes = crate::dns::host_notes(
        &read("/etc/nsswitch.conf"),
        &read("/etc/resolv.conf"),
        resolved_active,
        fallback,
    );
    let dns = json!({
        "systemd_resolved": resolved_active,
        "nss_resolve": crate::dns::nss_resolve_in_use(&read("/etc/nsswitch.conf")),
        "nss_resolve_fallback": fallback,
        "notes": dns_notes,
    });
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"kernel": kernel, "probes": probes, "backends": backends, "dns": dns, "ready": missing.is_empty()})
            )?
        );
    } else {
        println!("kernel {kernel}");
        println!("{:<48} {:<8} used for / kernel answer", "probe (real load)", "result");
        for Probe { name, ok, detail, used_for } in &probes {
            let res = if *ok { "ok" } else { "refused" };
            let info = if *ok { used_for.clone() } else { format!("{used_for}: {detail}") };
            println!("{name:<48} {res:<8} {info}");
        }
        println!();
        for k in [
            "process_lineage",
            "connect",
            "socket_create",
            "egress",
            "ipc",
            "file_open",
            "file_open_note",
        ] {
            println!("{k:<16} {}", backends[k].as_str().unwrap_or_default());
        }
        for n in &dns_notes {
            println!("{:<16} warning: {n}", "dns");
        }
        if !missing.is_empty() {
            println!("\nnot usable on this host: {} (run as root?)", missing.join(", "));
        }
    }
    Ok(if missing.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Why BPF-LSM may be refused, for an operator: whether `bpf` is in the kernel's active LSM
/// list (securityfs; doctor mounts nothing, so it may not be readable).
fn lsm_hint() -> String {
    match std::fs::read_to_string("/sys/kernel/security/lsm") {
        Ok(l) if l.trim().split(',').any(|x| x == "bpf") => format!(
            "`bpf` is in the active LSM list ({}) yet the load was refused: a platform policy (as on Firecracker hosts) or a locked-down kernel",
            l.trim()
        ),
        Ok(l) => format!(
            "`bpf` is not in the active LSM list ({}): a kernel built with CONFIG_BPF_LSM runs it once booted with lsm={},bpf",
            l.trim(),
            l.trim()
        ),
        Err(_) => {
            "the active LSM list is unreadable (securityfs not mounted at /sys/kernel/security)"
                .to_string()
        }
    }
}
