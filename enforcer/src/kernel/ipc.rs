//! The IPC alert's hooks (enforcer-ebpf/src/ipc.rs), userspace side: the first set this
//! kernel really loads and attaches, in order of cost:
//! 1. `cgroup`: `cgroup/connect_unix` + `cgroup/sendmsg_unix` on `cgroup_root` (Linux 6.7+).
//!    They run only for Unix connects and addressed Unix sends inside cgroup_root.
//! 2. `lsm`: `lsm/unix_stream_connect` + `lsm/unix_may_send` (where BPF-LSM is active).
//! 3. `tracepoint`: `syscalls/sys_enter_connect` + `sys_enter_sendto`, last resort: while
//!    attached, every system call of every task on the host takes the kernel's tracing
//!    entry path (README "Benchmark": +9-14% on open()/socket()). `status` and `doctor`
//!    name it in `programs_missing`.
//!
//! None is pinned: they only raise alerts, which need a daemon.
//!
//! aya 0.14 has no Unix attach types for cgroup sock_addr programs, and the kernel wants
//! the attach type at load (`expected_attach_type`). So the two programs, built in aya's
//! `cgroup/connect4` and `cgroup/sendmsg4` sections, are relocated against the maps aya
//! created (aya-obj, the same object) and loaded and linked here with the bpf(2) syscall.
//!
//! `ENFORCER_IPC_HOOKS` (`cgroup`, `lsm`, `tracepoint`, `off`) forces one set, for tests
//! and benchmarks (docs/contracts.md); unset or `auto` picks as above.
use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Btf, Ebpf,
    maps::Map,
    programs::{Lsm, TracePoint},
};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type};

use super::btf::KernelBtf;

/// The environment variable that forces one hook set.
pub const ENV: &str = "ENFORCER_IPC_HOOKS";

/// The cgroup programs and their attach types.
const CGROUP: [(&str, bpf_attach_type, &str); 2] = [
    ("ipc_unix_connect", bpf_attach_type::BPF_CGROUP_UNIX_CONNECT, "connect_unix"),
    ("ipc_unix_sendmsg", bpf_attach_type::BPF_CGROUP_UNIX_SENDMSG, "sendmsg_unix"),
];
/// The LSM programs and their hooks.
const LSM: [(&str, &str); 2] =
    [("ipc_lsm_connect", "unix_stream_connect"), ("ipc_lsm_send", "unix_may_send")];
/// The tracepoint programs and their syscall tracepoints.
const TRACEPOINT: [(&str, &str); 2] =
    [("ipc_connect", "sys_enter_connect"), ("ipc_sendto", "sys_enter_sendto")];

/// Globals the LSM variant reads (kernel BTF offsets; 0 when unknown: no path reported).
pub fn lsm_globals(btf: &KernelBtf) -> Vec<(&'static str, u32)> {
    vec![
        ("SOCKET_SK_OFF", btf.offset("socket", "sk").unwrap_or(0)),
        ("UNIX_SOCK_ADDR_OFF", btf.offset("unix_sock", "addr").unwrap_or(0)),
        ("UNIX_ADDRESS_LEN_OFF", btf.offset("unix_address", "len").unwrap_or(0)),
        ("UNIX_ADDRESS_NAME_OFF", btf.offset("unix_address", "name").unwrap_or(0)),
    ]
}

/// What `attach` attached.
pub struct IpcHooks {
    /// "cgroup", "lsm", "tracepoint" or "off".
    pub backend: &'static str,
    /// Program names for `status` (e.g. "cgroup_sock_addr/connect_unix").
    pub attached: Vec<String>,
    /// The kernel's answers to the cheaper sets it refused; empty when the first one loaded.
    pub refused: Vec<String>,
    /// The cgroup variant's programs and links: closing them detaches.
    _fds: Vec<OwnedFd>,
}

impl IpcHooks {
    /// For `status.backends.ipc`: the hooks and, for a fallback, what was refused.
    pub fn describe(&self) -> String {
        let hooks = match self.backend {
            "cgroup" => "cgroup_sock_addr (connect_unix, sendmsg_unix)",
            "lsm" => "lsm (unix_stream_connect, unix_may_send)",
            "tracepoint" => "tracepoint (syscalls/sys_enter_connect, sys_enter_sendto)",
            _ => "off",
        };
        if self.refused.is_empty() {
            hooks.to_string()
        } else {
            format!("{hooks}; refused: {}", self.refused.join("; "))
        }
    }

    /// The `programs_missing` entry: the last-resort tracepoints (a host-wide cost) or none.
    pub fn missing(&self) -> Option<String> {
        match self.backend {
            "tracepoint" => Some(format!(
                "{} (the IPC alert runs on syscall tracepoints instead: every system call on the host takes the kernel's tracing path)",
                if self.refused.is_empty() {
                    format!("cgroup_sock_addr/connect_unix: not tried ({ENV}=tracepoint)")
                } else {
                    self.refused.join("; ")
                }
            )),
            "off" => Some(format!("ipc alert: {}", self.refused.join("; "))),
            _ => None,
        }
    }
}

/// Attaches the first hook set this kernel loads (or the one `ENFORCER_IPC_HOOKS` names).
pub fn attach(ebpf: &mut Ebpf, object: &[u8], cgroup: &File, btf: &KernelBtf) -> Result<IpcHooks> {
    let forced = std::env::var(ENV).unwrap_or_default();
    let order: &[&'static str] = match forced.as_str() {
        "" | "auto" => &["cgroup", "lsm", "tracepoint"],
        "cgroup" => &["cgroup"],
        "lsm" => &["lsm"],
        "tracepoint" => &["tracepoint"],
        "off" => {
            return Ok(IpcHooks {
                backend: "off",
                attached: Vec::new(),
                refused: vec![format!("{ENV}=off")],
                _fds: Vec::new(),
            });
        }
        other => bail!("{ENV}={other:?}: expected auto, cgroup, lsm, tracepoint or off"),
    };
    let mut refused = Vec::new();
    for &backend in order {
        let r = match backend {
            "cgroup" => attach_cgroup(ebpf, object, cgroup, btf).map(|fds| {
                (CGROUP.iter().map(|c| format!("cgroup_sock_addr/{}", c.2)).collect(), fds)
            }),
            "lsm" => attach_lsm(ebpf, btf)
                .map(|()| (LSM.iter().map(|l| format!("lsm/{}", l.1)).collect(), Vec::new())),
            _ => attach_tracepoints(ebpf).map(|()| {
                (
                    TRACEPOINT.iter().map(|t| format!("tracepoint/syscalls/{}", t.1)).collect(),
                    Vec::new(),
                )
            }),
        };
        match r {
            Ok((attached, fds)) => {
                return Ok(IpcHooks { backend, attached, refused, _fds: fds });
            }
            Err(e) => refused.push(format!(
                "{}: {}",
                name_of(backend),
                super::verifier_answer(&format!("{e:#}"))
            )),
        }
    }
    Err(anyhow!("{}", refused.join("; ")))
}

/// The first program of a set, naming it in refusals.
fn name_of(backend: &str) -> &'static str {
    match backend {
        "cgroup" => "cgroup_sock_addr/connect_unix",
        "lsm" => "lsm/unix_stream_connect",
        _ => "tracepoint/syscalls/sys_enter_connect",
    }
}

fn attach_tracepoints(ebpf: &mut Ebpf) -> Result<()> {
    for (prog, tp) in TRACEPOINT {
        let p: &mut TracePoint = ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing from the eBPF object"))?
            .try_into()?;
        p.load().with_context(|| format!("load program {prog} (tracepoint)"))?;
        p.attach("syscalls", tp)
            .with_context(|| format!("attach program {prog} to tracepoint syscalls/{tp}"))?;
    }
    Ok(())
}

fn attach_lsm(ebpf: &mut Ebpf, btf: &KernelBtf) -> Result<()> {
    let btf = btf.aya()?;
    // Load both before attaching either: a refusal leaves nothing attached.
    for (prog, hook) in LSM {
        let p: &mut Lsm = ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing from the eBPF object"))?
            .try_into()?;
        p.load(hook, btf).with_context(|| format!("load lsm/{hook}"))?;
    }
    for (prog, hook) in LSM {
        let p: &mut Lsm = ebpf.program_mut(prog).expect("loaded above").try_into()?;
        p.attach().with_context(|| format!("attach lsm/{hook}"))?;
    }
    Ok(())
}

/// Loads the cgroup programs (see `load_cgroup`) and links them to `cgroup`. The fds to keep
/// (programs, links).
fn attach_cgroup(
    ebpf: &Ebpf,
    object: &[u8],
    cgroup: &File,
    btf: &KernelBtf,
) -> Result<Vec<OwnedFd>> {
    let loaded = load_cgroup(ebpf, object, btf)?;
    let mut out = Vec::new();
    for (fd, (prog, attach_type, _)) in loaded.into_iter().zip(CGROUP) {
        let link = link_create(&fd, cgroup.as_raw_fd(), attach_type)
            .with_context(|| format!("attach program {prog} ({attach_type:?}) to cgroup_root"))?;
        out.push(fd);
        out.push(link);
    }
    Ok(out)
}

/// For `doctor`: whether this kernel loads the cgroup variant, then the LSM one (the
/// kernel's answer to each). Nothing is attached.
pub fn probe(ebpf: &mut Ebpf, object: &[u8]) -> (Result<()>, Option<Result<()>>) {
    let cgroup = KernelBtf::load().and_then(|btf| load_cgroup(ebpf, object, &btf).map(|_| ()));
    if cgroup.is_ok() {
        return (cgroup, None);
    }
    let lsm = (|| -> Result<()> {
        let btf = Btf::from_sys_fs().context("kernel BTF (/sys/kernel/btf/vmlinux)")?;
        let (prog, hook) = LSM[0];
        let p: &mut Lsm = ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing"))?
            .try_into()?;
        p.load(hook, &btf)?;
        Ok(())
    })();
    (cgroup, Some(lsm.map_err(|e| anyhow!("{}", super::verifier_answer(&format!("{e:#}"))))))
}

/// Relocates the cgroup programs against the maps aya created for `object` and loads them
/// with the Unix attach types (program fds, in `CGROUP` order).
fn load_cgroup(ebpf: &Ebpf, object: &[u8], btf: &KernelBtf) -> Result<Vec<OwnedFd>> {
    // The programs read `struct bpf_sock_addr_kern` at these offsets (Linux 6.7 layout).
    let uaddr = btf.offset("bpf_sock_addr_kern", "uaddr")?;
    let uaddrlen = btf.offset("bpf_sock_addr_kern", "uaddrlen")?;
    if (uaddr, uaddrlen) != (8, 32) {
        bail!("bpf_sock_addr_kern has uaddr at {uaddr}, uaddrlen at {uaddrlen} (expected 8, 32)");
    }
    let mut obj = aya_obj::Object::parse(object).context("parse the eBPF object")?;
    let maps: Vec<(String, aya_obj::Map)> = obj.maps.drain().collect();
    let mut fds = Vec::new();
    for (name, def) in &maps {
        // aya leaves out nothing this kernel can create; a map it did not create is unused.
        if let Some(m) = ebpf.map(name) {
            fds.push((name.as_str(), map_fd(name, m)?, def));
        }
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    obj.relocate_maps(fds.into_iter(), &text_sections).context("relocate maps")?;
    obj.relocate_calls(&text_sections).context("relocate calls")?;
    let mut loaded = Vec::new();
    for (prog, attach_type, _) in CGROUP {
        let p = obj
            .programs
            .get(prog)
            .with_context(|| format!("program {prog} missing from the eBPF object"))?;
        let f = &obj.functions[&p.function_key()];
        loaded.push(prog_load(prog, &f.instructions, attach_type)?);
    }
    Ok(loaded)
}

fn map_fd(name: &str, m: &Map) -> Result<RawFd> {
    let d = match m {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::LpmTrie(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::RingBuf(d)
        | Map::SkStorage(d)
        | Map::InodeStorage(d)
        | Map::CgrpStorage(d)
        | Map::Queue(d)
        | Map::Stack(d)
        | Map::Unsupported(d) => d,
        _ => bail!("map {name}: type not handled by the IPC program loader"),
    };
    // Borrowed: the map stays owned by aya (and by the daemon after it).
    Ok(d.fd().as_fd().as_raw_fd())
}

/// The bpf(2) system call with a full `bpf_attr` (zero beyond what `cmd` reads); the new fd.
pub(super) fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    // SAFETY: attr is a fully initialised bpf_attr of the size passed; the kernel reads (and
    // for the log, writes into buffers that outlive the call) only what `cmd` defines.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// BPF_PROG_LOAD of a cgroup sock_addr program with `attach_type`; on refusal, again with a
/// verifier log, whose last words are in the error.
fn prog_load(name: &str, insns: &[bpf_insn], attach_type: bpf_attach_type) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 1 << 20];
    let mut attempt = |with_log: bool| {
        // SAFETY: bpf_attr is plain old data; all zero is its "unset" value.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the prog-load member of the zeroed union.
        let u = unsafe { &mut attr.__bindgen_anon_3 };
        u.prog_type = bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR as u32;
        u.expected_attach_type = attach_type as u32;
        u.insns = insns.as_ptr() as u64;
        u.insn_cnt = insns.len() as u32;
        u.license = license.as_ptr() as u64;
        for (d, s) in u.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s as libc::c_char;
        }
        if with_log {
            u.log_level = 1;
            u.log_buf = log.as_mut_ptr() as u64;
            u.log_size = log.len() as u32;
        }
        bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    match attempt(false) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            let _ = attempt(true);
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0');
            let said = text.lines().rev().find(|l| {
                let l = l.trim();
                !l.is_empty()
                    && !l.starts_with("processed ")
                    && !l.starts_with("verification time")
                    && !l.starts_with("stack depth")
            });
            match said {
                Some(s) => bail!("load program {name}: {e}: {}", s.trim()),
                None => bail!("load program {name}: {e}"),
            }
        }
    }
}

fn link_create(prog: &OwnedFd, target: RawFd, attach_type: bpf_attach_type) -> io::Result<OwnedFd> {
    // SAFETY: as in prog_load.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the link-create member of the zeroed union.
    let l = unsafe { &mut attr.link_create };
    l.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    l.__bindgen_anon_2.target_fd = target as u32;
    l.attach_type = attach_type as u32;
    bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)
}
