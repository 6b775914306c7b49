//! Feature detection by real loads: each program type is loaded into this kernel (and
//! unloaded); the result, with the kernel's own error, decides which backend each hook uses.
use std::os::fd::AsFd;

use aya::{
    Btf, EbpfLoader,
    programs::{BtfTracePoint, CgroupSkb, CgroupSock, CgroupSockAddr, FEntry, Lsm, RawTracePoint},
};
use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// What was tried, e.g. "lsm/file_open".
    pub name: String,
    pub ok: bool,
    /// The kernel's answer when refused.
    pub detail: String,
    /// What the daemon uses it for.
    pub used_for: String,
}

fn probe(name: &str, used_for: &str, r: anyhow::Result<()>) -> Probe {
    Probe {
        name: name.into(),
        ok: r.is_ok(),
        detail: match r {
            Ok(()) => "loaded".into(),
            Err(e) => format!("{e:#}"),
        },
        used_for: used_for.into(),
    }
}

/// Runs every probe. Needs root (CAP_BPF, CAP_SYS_ADMIN).
pub fn run_all() -> Vec<Probe> {
    let mut out = Vec::new();
    let object = match super::object() {
        Ok(o) => o,
        Err(e) => {
            out.push(probe("ebpf-object", "all kernel programs", Err(e)));
            return out;
        }
    };
    let btf = Btf::from_sys_fs().map_err(anyhow::Error::from);
    out.push(probe(
        "btf /sys/kernel/btf/vmlinux",
        "tp_btf, lsm, fentry loads",
        btf.as_ref().map(|_| ()).map_err(|e| anyhow::anyhow!("{e:#}")),
    ));
    out.push(probe(
        "tracefs",
        "tracepoint attach and field offsets",
        super::tracefs::ensure_mounted().map(|_| ()),
    ));

    // The object's maps are pinned by name: give this probe load a throwaway pin dir so it
    // never touches (or adopts) a running daemon's maps.
    let pin_dir =
        std::path::PathBuf::from(format!("/sys/fs/bpf/enforcer-doctor-{}", std::process::id()));
    if let Err(e) = super::ensure_pin_dir(&pin_dir) {
        out.push(probe("bpffs", "pinned maps and links (fail closed)", Err(e)));
        return out;
    }
    out.push(probe("bpffs", "pinned maps and links (fail closed)", Ok(())));
    let out = probe_loads(object, &pin_dir, btf, out);
    if let Ok(rd) = std::fs::read_dir(&pin_dir) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(&pin_dir);
    out
}

fn probe_loads(
    object: &[u8],
    pin_dir: &std::path::Path,
    btf: anyhow::Result<Btf>,
    mut out: Vec<Probe>,
) -> Vec<Probe> {
    if let Err(e) = super::sock_storage::ensure_pinned(pin_dir) {
        out.push(probe(
            "socket-local storage (BPF_MAP_TYPE_SK_STORAGE)",
            "per-socket state of the egress hook",
            Err(e),
        ));
        return out;
    }
    let mut ebpf = match EbpfLoader::new().default_map_pin_directory(pin_dir).load(object) {
        Ok(e) => e,
        Err(e) => {
            out.push(probe(
                "map creation (ringbuf, hash, lru, per-cpu array)",
                "kernel to daemon records",
                Err(e.into()),
            ));
            return out;
        }
    };
    out.push(probe(
        "map creation (ringbuf, hash, lru, per-cpu array)",
        "kernel to daemon records",
        Ok(()),
    ));

    let r = (|| -> anyhow::Result<()> {
        let p: &mut RawTracePoint = ebpf
            .program_mut("task_newtask")
            .ok_or_else(|| anyhow::anyhow!("missing"))?
            .try_into()?;
        p.load()?;
        Ok(())
    })();
    out.push(probe(
        "raw_tracepoint",
        "process lineage (task_newtask, sched_process_exec, sched_process_exit), pinnable",
        r,
    ));

    let r = (|| -> anyhow::Result<()> {
        let p: &mut CgroupSockAddr =
            ebpf.program_mut("connect4").ok_or_else(|| anyhow::anyhow!("missing"))?.try_into()?;
        p.load()?;
        Ok(())
    })();
    out.push(probe(
        "cgroup_sock_addr/connect4",
        "outbound connection attribution and in-kernel deny",
        r,
    ));

    let r = (|| -> anyhow::Result<()> {
        let p: &mut CgroupSock = ebpf
            .program_mut("sock_create")
            .ok_or_else(|| anyhow::anyhow!("missing"))?
            .try_into()?;
        p.load()?;
        Ok(())
    })();
    out.push(probe(
        "cgroup_sock/sock_create",
        "sockets no connect hook judges (raw, ping, SCTP, ...): in-kernel deny for judged processes",
        r,
    ));

    // The egress hook: the writer-judging program, else the owner-only one (kernels whose
    // cgroup_skb programs may not read the current task); the kernel's answer is the detail.
    let skb = |ebpf: &mut aya::Ebpf, prog: &str| -> anyhow::Result<()> {
        let p: &mut CgroupSkb =
            ebpf.program_mut(prog).ok_or_else(|| anyhow::anyhow!("missing"))?.try_into()?;
        p.load()?;
        Ok(())
    };
    let r = skb(&mut ebpf, "egress")
        .map_err(|e| anyhow::anyhow!(super::verifier_answer(&format!("{e:#}"))));
    let writer = r.is_ok();
    out.push(probe(
        "cgroup_skb/egress",
        "data on established sockets judged by the writer (current task) and the socket's owner",
        r,
    ));
    if !writer {
        out.push(probe(
            "cgroup_skb/egress_owner",
            "fallback: data on established sockets judged by the socket's judged creator only",
            skb(&mut ebpf, "egress_owner"),
        ));
    }

    // The IPC alert: the cgroup Unix-socket hooks, else BPF-LSM, else syscall tracepoints.
    let (cgroup, lsm) = super::ipc::probe(&mut ebpf, object);
    let cgroup_ok = cgroup.is_ok();
    out.push(probe(
        "ipc cgroup_sock_addr/connect_unix (6.7+)",
        "IPC alert (Unix connect/send by processes holding secrets); no cost outside Unix sockets",
        cgroup,
    ));
    if let Some(lsm) = lsm {
        let lsm_ok = lsm.is_ok();
        out.push(probe(
            "ipc lsm/unix_stream_connect (BPF-LSM)",
            "IPC alert fallback; no cost outside Unix sockets",
            lsm,
        ));
        if !lsm_ok && !cgroup_ok {
            out.push(probe(
                "ipc tracepoint/syscalls/sys_enter_connect",
                "last resort: every system call on the host takes the kernel's tracing path while the daemon runs",
                Ok(()),
            ));
        }
    }

    let btf = btf.ok();
    let with_btf = |f: &mut dyn FnMut(&Btf) -> anyhow::Result<()>| -> anyhow::Result<()> {
        match &btf {
            Some(b) => f(b),
            None => anyhow::bail!("no kernel BTF"),
        }
    };
    let r = with_btf(&mut |b| {
        let p: &mut BtfTracePoint = ebpf
            .program_mut("probe_tp_btf")
            .ok_or_else(|| anyhow::anyhow!("missing"))?
            .try_into()?;
        p.load("sched_process_exec", b)?;
        Ok(())
    });
    out.push(probe("tp_btf/sched_process_exec", "not needed: stable tracepoints cover lineage", r));
    let r = with_btf(&mut |b| {
        let p: &mut Lsm = ebpf
            .program_mut("probe_lsm_file_open")
            .ok_or_else(|| anyhow::anyhow!("missing"))?
            .try_into()?;
        p.load("file_open", b)?;
        Ok(())
    });
    out.push(probe("lsm/file_open (BPF-LSM)", "inline secret-open decisions in the kernel", r));
    let r = with_btf(&mut |b| {
        let p: &mut FEntry = ebpf
            .program_mut("probe_fentry")
            .ok_or_else(|| anyhow::anyhow!("missing"))?
            .try_into()?;
        p.load("do_sys_openat2", b)?;
        Ok(())
    });
    out.push(probe("fentry/do_sys_openat2", "not needed", r));
    out.push(probe(
        "fanotify FAN_OPEN_PERM inode mark",
        "secret-file open attribution (and deny)",
        fanotify_probe(),
    ));
    out
}

/// A permission-class group with an inode mark on a temp file: what the file backend needs.
fn fanotify_probe() -> anyhow::Result<()> {
    let fan = Fanotify::init(
        InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC,
        EventFFlags::O_RDONLY,
    )?;
    let dir = std::env::temp_dir().join(format!("enforcer-probe-{}", std::process::id()));
    std::fs::write(&dir, b"")?;
    let r = fan.mark(
        MarkFlags::FAN_MARK_ADD,
        MaskFlags::FAN_OPEN_PERM,
        nix::fcntl::AT_FDCWD,
        Some(&dir),
    );
    let _ = std::fs::remove_file(&dir);
    let _ = fan.as_fd();
    r?;
    Ok(())
}
