//! Loading and attaching the kernel programs. One file per concern: tracefs offsets,
//! feature probes, the policy and grant maps. Ring-buffer records are decoded in `crate::records`.
pub mod btf;
pub mod grants;
pub mod ipc;
pub mod lsm;
pub mod policy;
pub mod probe;
pub mod sock_storage;
pub mod tracefs;

use std::os::unix::fs::DirBuilderExt;
use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        RawTracePoint,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use enforcer_common::counter;

use crate::policy::FileBackend;

/// The eBPF object built by `cargo xtask build`, embedded by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer.bpf.o"));

/// Lineage programs: raw tracepoints (pinnable links). No syscalls/* tracepoint on
/// purpose: attaching one puts every syscall of every process on the slow tracing path.
const RAW_TRACEPOINTS: [&str; 3] = ["task_newtask", "sched_process_exec", "sched_process_exit"];

/// Connect programs, attached to `cgroup_root`; the recvmsg ones give DNS replies steered
/// through the stub the resolver's address as their source (enforcer-ebpf/src/dns.rs).
const SOCK_ADDR: [&str; 6] =
    ["connect4", "connect6", "sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6"];

/// Socket-creation program, attached to `cgroup_root`: judged processes may not create
/// sockets the connect hooks do not see (raw, ping, SCTP, ...).
const SOCK_CREATE: &str = "sock_create";

/// Data on established sockets (egress), attached to `cgroup_root`. Optional: a kernel that
/// refuses both variants runs without, and `status` names what is missing. Its per-socket
/// state is socket-local storage (`sock_storage.rs`), freed with the socket.
const EGRESS: &str = "egress";
/// The egress variant for kernels that refuse the current task in cgroup_skb.
const EGRESS_OWNER: &str = "egress_owner";

pub struct Kernel {
    ebpf: Ebpf,
    /// Names of the programs attached, for `status`.
    pub attached: Vec<String>,
    pin_dir: PathBuf,
    /// This daemon's links, pinned: they stay when it stops (`detach_pins` removes them).
    _links: Vec<PinnedLink>,
    /// The maps (grants, holdings, ring buffer) were adopted from a previous daemon's pins.
    pub adopted: bool,
    /// Which backend decides secret-file opens: "bpf-lsm" or "fanotify".
    pub file_backend: &'static str,
    /// Why fanotify runs where BPF-LSM was tried (the kernel's answer); empty otherwise.
    pub file_backend_note: String,
    /// Optional programs this kernel refused, with the reason, for `status` and `doctor`.
    pub missing: Vec<String>,
    /// Why egress runs as `egress_owner` (the kernel's answer to `egress`); empty otherwise.
    pub egress_note: String,
    /// The IPC alert's hooks (their fds keep the cgroup variant attached); None if none loaded.
    pub ipc: Option<ipc::IpcHooks>,
}

/// The kernel's two record rings: routine records (lineage, allowed connects) and
/// violations, which a flood of routine records can never displace.
pub struct Rings {
    pub events: RingBuf<MapData>,
    pub alerts: RingBuf<MapData>,
}

/// The DNS stub's kernel maps.
pub struct DnsMaps {
    pub learned: aya::maps::HashMap<MapData, enforcer_common::LearnedKey, enforcer_common::Learned>,
    pub steer: aya::maps::HashMap<MapData, u64, enforcer_common::DnsSteer>,
    /// GRANT_DESTS, for the host entries of addresses learned for secrets' names.
    pub dests: aya::maps::LpmTrie<MapData, enforcer_common::DestKey, enforcer_common::PortRanges>,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counters {
    pub ringbuf_drops: u64,
    pub events: u64,
    /// Inherited per-process state the kernel could not store (PROC_GRANTS full).
    pub state_full: u64,
    /// Violation records lost (ALERTS ring full).
    pub alert_drops: u64,
}

pub fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!(
            "this enforcer binary was built without its eBPF object; build it with `cargo xtask build`"
        );
    }
    Ok(OBJECT)
}

/// bpffs at /sys/fs/bpf (mounted when absent) and the pin dir in it (0700).
pub(crate) fn ensure_pin_dir(pin_dir: &Path) -> Result<()> {
    let bpffs = Path::new("/sys/fs/bpf");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if pin_dir.starts_with(bpffs)
        && !mounts.lines().any(|l| {
            l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && l.split_whitespace().nth(2) == Some("bpf")
        })
    {
        nix::mount::mount(
            Some("bpf"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mount bpffs at /sys/fs/bpf")?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(pin_dir)
        .with_context(|| format!("create pin dir {}", pin_dir.display()))?;
    Ok(())
}

/// Pins an attached program's link as `<pin_dir>/link-<prog>-new` (renamed into place once
/// every new link is attached).
fn pin_link(fd: FdLink, pin_dir: &Path, prog: &str) -> Result<PinnedLink> {
    let path = pin_dir.join(format!("link-{prog}-new")); // bpffs refuses names with dots
    let _ = std::fs::remove_file(&path);
    fd.pin(&path).with_context(|| format!("pin link of {prog} at {}", path.display()))
}

/// Pins a cgroup program's bpf_link (cgroup links are always bpf_links here, see `load`).
fn pin_cgroup_link<L>(link: L, pin_dir: &Path, prog: &str) -> Result<PinnedLink>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let fd = FdLink::try_from(link)
        .map_err(|e| anyhow::anyhow!("program {prog}: link cannot be pinned: {e}"))?;
    pin_link(fd, pin_dir, prog)
}

/// What `attach_egress` attached: the pinned link, the egress program's name and, for the
/// fallback, the kernel's answer to the full program.
type Egress = (Vec<(&'static str, PinnedLink)>, &'static str, String);

/// Loads and attaches the egress program. The one judging the writer (the current task) is
/// tried first; a kernel whose cgroup_skb programs may not read the current task gets the
/// owner-only variant. Returns the link, the program attached and, for the fallback, the
/// kernel's answer to the first.
fn attach_egress(ebpf: &mut Ebpf, cgroup: &File, pin_dir: &Path) -> Result<Egress> {
    let load = |ebpf: &mut Ebpf, prog: &str| -> Result<()> {
        let p: &mut CgroupSkb = ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing from the eBPF object"))?
            .try_into()?;
        p.load().with_context(|| format!("load program {prog} (cgroup_skb)"))?;
        Ok(())
    };
    let (egress, note) = match load(ebpf, EGRESS) {
        Ok(()) => (EGRESS, String::new()),
        Err(e) => {
            load(ebpf, EGRESS_OWNER).map_err(|e2| e2.context(format!("after {e:#}")))?;
            (EGRESS_OWNER, verifier_answer(&format!("{e:#}")))
        }
    };
    let p: &mut CgroupSkb = ebpf.program_mut(egress).expect("loaded above").try_into()?;
    let id = p.attach(cgroup, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)?;
    let link = pin_cgroup_link(p.take_link(id)?, pin_dir, egress)?;
    Ok((vec![(egress, link)], egress, note))
}

/// The verifier's last words (e.g. "unknown func bpf_get_current_pid_tgid#14") out of an
/// aya load error, without the instruction dump.
pub fn verifier_answer(err: &str) -> String {
    let Some((head, log)) = err.split_once(" Verifier output:") else {
        return err.to_string();
    };
    let head = head.trim_end_matches('.');
    let said = log.lines().rfind(|l| {
        let l = l.trim_start();
        !l.is_empty()
            && !l.starts_with(|c: char| c.is_ascii_digit())
            && !l.starts_with("R")
            && !l.starts_with("frame")
            && !l.starts_with("caller")
            && !l.starts_with("callee")
            && !l.starts_with("returning")
            && !l.starts_with("verification time")
            && !l.starts_with("stack depth")
            && !l.starts_with("processed ")
            && !l.starts_with(':')
            && !l.contains(" Verifier output:")
    });
    match said {
        Some(s) => format!("{head}: {}", s.trim()),
        None => head.to_string(),
    }
}

impl Kernel {
    /// Loads the object with this kernel's offsets, reusing the maps pinned in `pin_dir` by
    /// a previous daemon (so grants, holdings and queued records survive), attaches the
    /// lineage tracepoints (host-wide) and the connect hooks on `cgroup_root`, pins the new
    /// links, and only then drops the previous daemon's links: enforcement never pauses.
    /// `file_backend`: whether to try the BPF-LSM `file_open` program (auto: where the
    /// kernel loads it; bpf-lsm: or fail).
    pub fn load(
        cgroup_root: &Path,
        pin_dir: &Path,
        file_backend: FileBackend,
    ) -> Result<(Kernel, Rings)> {
        let object = object()?;
        // aya's loader parses the kernel's whole BTF when it is made (for CO-RE relocations,
        // which this object has none of: rustc emits none), tens of MB of heap at the
        // daemon's start-up peak: dropped at once; `KernelBtf` answers offsets from the raw
        // bytes, and BPF-LSM loads get aya's parse from it (one, dropped with it).
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        ensure_pin_dir(pin_dir)?;
        let adopted = pin_dir.join("GRANTS").exists();
        let old_links: Vec<PinnedLink> = std::fs::read_dir(pin_dir)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("link-"))
            .filter_map(|e| PinnedLink::from_pin(e.path()).ok())
            .collect();
        // Whether sched_process_exit has its group_dead argument (newer kernels), from the
        // tracepoint's format; without it the thread-group leader's exit stands for the process.
        let tfs = tracefs::ensure_mounted().ok();
        let has_group_dead = match &tfs {
            Some(tfs) => tracefs::field_offset(tfs, "sched", "sched_process_exit", "group_dead")?
                .is_some() as u32,
            None => 0,
        };
        // Where the Unix-socket address is in the syscall tracepoints' records (0: unknown,
        // the IPC programs then do nothing).
        let syscall_field = |name: &str, field: &str| -> u32 {
            tfs.as_ref()
                .and_then(|t| tracefs::field_offset(t, "syscalls", name, field).ok().flatten())
                .unwrap_or(0)
        };
        let btf = btf::KernelBtf::load()?;
        let globals: Vec<(&str, u32)> = vec![
            ("TASK_TGID_OFF", btf.offset("task_struct", "tgid")?),
            ("TASK_REAL_PARENT_OFF", btf.offset("task_struct", "real_parent")?),
            ("BPRM_FILENAME_OFF", btf.offset("linux_binprm", "filename")?),
            ("EXIT_HAS_GROUP_DEAD", has_group_dead),
            ("TASK_MM_OFF", btf.offset("task_struct", "mm")?),
            ("MM_ARG_START_OFF", btf.offset("mm_struct", "arg_start")?),
            ("MM_ARG_END_OFF", btf.offset("mm_struct", "arg_end")?),
            ("MM_EXE_FILE_OFF", btf.offset("mm_struct", "exe_file")?),
            ("FILE_INODE_OFF", btf.offset("file", "f_inode")?),
            ("INODE_INO_OFF", btf.offset("inode", "i_ino")?),
            ("INODE_SB_OFF", btf.offset("inode", "i_sb")?),
            ("SB_DEV_OFF", btf.offset("super_block", "s_dev")?),
            ("LSM_FILE_INODE_OFF", btf.offset("file", "f_inode")?),
            ("LSM_INODE_INO_OFF", btf.offset("inode", "i_ino")?),
            ("LSM_INODE_SB_OFF", btf.offset("inode", "i_sb")?),
            ("LSM_SB_DEV_OFF", btf.offset("super_block", "s_dev")?),
            ("LSM_INODE_NLINK_OFF", btf.offset("inode", "i_nlink")?),
            ("FILE_DENTRY_OFF", btf.offset("file", "f_path")? + btf.offset("path", "dentry")?),
            ("DENTRY_PARENT_OFF", btf.offset("dentry", "d_parent")?),
            ("DENTRY_NAME_OFF", btf.offset("dentry", "d_name")? + btf.offset("qstr", "name")?),
            ("DENTRY_INODE_OFF", btf.offset("dentry", "d_inode")?),
            ("TASK_LEADER_OFF", btf.offset("task_struct", "group_leader")?),
            ("TASK_START_OFF", btf.offset("task_struct", "start_boottime")?),
            // 0 (unknown) makes the egress hook judge TCP by the socket's owner only.
            ("SK_LOCK_OWNED_OFF", btf.offset("sock", "sk_lock.owned").unwrap_or(0)),
            ("CONNECT_ADDR_OFF", syscall_field("sys_enter_connect", "uservaddr")),
            ("CONNECT_ADDRLEN_OFF", syscall_field("sys_enter_connect", "addrlen")),
            ("SENDTO_ADDR_OFF", syscall_field("sys_enter_sendto", "addr")),
            ("SENDTO_ADDRLEN_OFF", syscall_field("sys_enter_sendto", "addr_len")),
        ];
        let globals: Vec<(&str, u32)> = globals.into_iter().chain(ipc::lsm_globals(&btf)).collect();
        // Socket-local storage needs BTF the object lacks: created and pinned first, then
        // found by aya like every pinned map.
        sock_storage::ensure_pinned(pin_dir)?;
        loader.default_map_pin_directory(pin_dir);
        for (name, value) in &globals {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader.load(object).context("load the eBPF object (maps and globals)")?;

        let mut attached = Vec::new();
        let mut links = Vec::new();
        for prog in RAW_TRACEPOINTS {
            let p: &mut RawTracePoint = ebpf
                .program_mut(prog)
                .with_context(|| format!("program {prog} missing from the eBPF object"))?
                .try_into()?;
            p.load().with_context(|| format!("load program {prog} (raw_tracepoint)"))?;
            let id = p
                .attach(prog)
                .with_context(|| format!("attach program {prog} to raw tracepoint {prog}"))?;
            links.push((prog, pin_link(p.take_link(id)?.into(), pin_dir, prog)?));
            attached.push(format!("raw_tracepoint/{prog}"));
        }
        let cgroup = File::open(cgroup_root)
            .with_context(|| format!("open cgroup_root {}", cgroup_root.display()))?;
        for prog in SOCK_ADDR {
            let p: &mut CgroupSockAddr = ebpf
                .program_mut(prog)
                .with_context(|| format!("program {prog} missing from the eBPF object"))?
                .try_into()?;
            p.load().with_context(|| format!("load program {prog} (cgroup_sock_addr)"))?;
            // Attached through a bpf_link, which always coexists with other programs on the
            // cgroup (the kernel refuses BPF_F_ALLOW_MULTI on link_create: flags must be 0).
            let id = p.attach(&cgroup, CgroupAttachMode::Single).with_context(|| {
                format!("attach program {prog} to cgroup {}", cgroup_root.display())
            })?;
            links.push((prog, pin_cgroup_link(p.take_link(id)?, pin_dir, prog)?));
            attached.push(format!("cgroup_sock_addr/{prog}"));
        }
        let prog = SOCK_CREATE;
        let p: &mut CgroupSock = ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing from the eBPF object"))?
            .try_into()?;
        p.load().with_context(|| format!("load program {prog} (cgroup_sock)"))?;
        let id = p.attach(&cgroup, CgroupAttachMode::Single).with_context(|| {
            format!("attach program {prog} to cgroup {}", cgroup_root.display())
        })?;
        links.push((prog, pin_cgroup_link(p.take_link(id)?, pin_dir, prog)?));
        attached.push(format!("cgroup_sock/{prog}"));
        // Secret opens: BPF-LSM where this kernel loads it, else fanotify (in the daemon).
        let (file_backend, file_backend_note) = match file_backend {
            FileBackend::Fanotify => ("fanotify", "file_backend = \"fanotify\"".to_string()),
            _ => match lsm::attach(&mut ebpf, &btf) {
                Ok(lsm_links) => {
                    for (prog, link) in lsm_links {
                        links.push((prog, pin_link(link, pin_dir, prog)?));
                        attached.push(format!("lsm/{prog}"));
                    }
                    ("bpf-lsm", String::new())
                }
                Err(e) if file_backend == FileBackend::BpfLsm => {
                    return Err(e.context(
                        "file_backend = \"bpf-lsm\" but this kernel refuses the BPF-LSM program (use \"auto\" to fall back to fanotify)",
                    ));
                }
                Err(e) => ("fanotify", format!("BPF-LSM refused by this kernel: {e:#}")),
            },
        };
        let mut missing = Vec::new();
        let mut egress_note = String::new();
        match attach_egress(&mut ebpf, &cgroup, pin_dir) {
            Ok((mut l, egress, note)) => {
                if !note.is_empty() {
                    tracing::warn!(refused = %note, "egress judged by socket owner only: this kernel refuses the current task in cgroup_skb");
                }
                egress_note = note;
                attached.push(format!("cgroup_skb/{egress}"));
                links.append(&mut l);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "egress hook not attached: data on established sockets is not judged");
                missing.push(format!("cgroup_skb/{EGRESS}: {e:#}"));
            }
        }
        let ipc = match ipc::attach(&mut ebpf, object, &cgroup, &btf) {
            Ok(h) => {
                attached.extend(h.attached.iter().cloned());
                if let Some(m) = h.missing() {
                    tracing::warn!(backend = h.backend, "{m}");
                    missing.push(m);
                }
                Some(h)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "ipc alert not attached: Unix-socket use by tainted processes is not seen");
                missing.push(format!("ipc alert: {e:#}"));
                None
            }
        };
        // Everything that needed the kernel's BTF is loaded.
        drop(btf);
        // The new programs run; the previous daemon's can go.
        for old in old_links {
            let _ = old.unpin();
        }
        // A previous version's evictable socket map (its programs are gone now).
        let _ = std::fs::remove_file(pin_dir.join(sock_storage::OLD_NAME));
        let mut pinned = Vec::new();
        for (prog, link) in links {
            let fd = link.unpin().context("re-pin link")?;
            let path = pin_dir.join(format!("link-{prog}"));
            pinned.push(
                fd.pin(&path)
                    .with_context(|| format!("pin link of {prog} at {}", path.display()))?,
            );
        }
        let events = RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS missing")?)?;
        let alerts = RingBuf::try_from(ebpf.take_map("ALERTS").context("map ALERTS missing")?)?;
        Ok((
            Kernel {
                ebpf,
                attached,
                pin_dir: pin_dir.to_path_buf(),
                _links: pinned,
                adopted,
                file_backend,
                file_backend_note,
                missing,
                egress_note,
                ipc,
            },
            Rings { events, alerts },
        ))
    }

    /// Where the links and maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Takes the policy maps (secrets, config, agent selectors) out of the object.
    pub fn policy_maps(&mut self) -> Result<policy::PolicyMaps> {
        policy::PolicyMaps::take(&mut self.ebpf)
    }

    /// Takes the BPF-LSM backend's maps out of the object.
    pub fn lsm_maps(&mut self) -> Result<lsm::LsmMaps> {
        lsm::LsmMaps::take(&mut self.ebpf)
    }

    /// Takes the grant maps out of the object, for the mint's registry.
    pub fn grant_maps(&mut self) -> Result<grants::GrantMaps> {
        grants::GrantMaps::take(&mut self.ebpf)
    }

    /// Takes the DNS stub's maps out of the object: LEARNED (addresses learned by name) and
    /// DNS_STEER (who asked, by socket cookie).
    pub fn dns_maps(&mut self) -> Result<DnsMaps> {
        let mut take = |name: &str| {
            self.ebpf
                .take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        let learned = aya::maps::HashMap::try_from(take("LEARNED")?)?;
        let steer = aya::maps::HashMap::try_from(take("DNS_STEER")?)?;
        // The grant registry holds GRANT_DESTS; the stub writes only secrets' send slots.
        let pin = self.pin_dir.join("GRANT_DESTS");
        let data = MapData::from_pin(&pin)
            .with_context(|| format!("open the pinned map {}", pin.display()))?;
        let dests = aya::maps::LpmTrie::try_from(aya::maps::Map::from_map_data(data)?)?;
        Ok(DnsMaps { learned, steer, dests })
    }

    pub fn counters(&self) -> Counters {
        let Some(map) = self.ebpf.map("COUNTERS") else { return Counters::default() };
        let Ok(arr) = PerCpuArray::<_, u64>::try_from(map) else { return Counters::default() };
        let sum = |i: u32| arr.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
        Counters {
            ringbuf_drops: sum(counter::RINGBUF_DROPS),
            events: sum(counter::EVENTS),
            state_full: sum(counter::STATE_FULL),
            alert_drops: sum(counter::ALERT_DROPS),
        }
    }
}

/// Removes every pin under `pin_dir` (links first, so the programs detach, then the maps)
/// and `pin_dir` itself: what `enforcer detach` does. A daemon stopping leaves the pins for
/// the next one to adopt; the caller makes sure no daemon runs. The paths removed.
pub fn detach_pins(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(pin_dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read pin dir {}", pin_dir.display())),
    };
    let is_link =
        |p: &PathBuf| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link-"));
    entries.sort_by_key(|p| (!is_link(p), p.clone()));
    let mut removed = Vec::new();
    for p in entries {
        std::fs::remove_file(&p).with_context(|| format!("unpin {}", p.display()))?;
        removed.push(p);
    }
    std::fs::remove_dir(pin_dir).with_context(|| format!("remove {}", pin_dir.display()))?;
    Ok(removed)
}

/// The cgroup2 mount point, from /proc/mounts (hybrid hosts mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Result<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (_, Some(dir), Some(fstype)) = (f.next(), f.next(), f.next()) else { continue };
        if fstype == "cgroup2" {
            return Ok(dir.into());
        }
    }
    bail!("no cgroup2 filesystem in /proc/mounts: the connect hooks need cgroup v2")
}

#[cfg(test)]
mod tests {
    use super::verifier_answer;

    #[test]
    fn verifier_answer_keeps_the_refusal_not_the_dump() {
        let e = "load program egress (cgroup_skb): the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). Verifier output: 0: R1=ctx() R10=fp0\n0: (bf) r8 = r1 ; R1=ctx()\ncaller:\n R6=1\n 1023: (85) call bpf_get_current_uid_gid#15\nprogram of this type cannot use helper bpf_get_current_uid_gid#15\nverification time 37876 usec\nstack depth 384+0\nprocessed 2014 insns (limit 1000000)\n: Invalid argument (os error 22)";
        assert_eq!(
            verifier_answer(e),
            "load program egress (cgroup_skb): the BPF_PROG_LOAD syscall returned Invalid argument (os error 22): program of this type cannot use helper bpf_get_current_uid_gid#15"
        );
        assert_eq!(verifier_answer("no such program"), "no such program");
    }
}
