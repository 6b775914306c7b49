//! Loading and attaching the kernel programs. One file per concern: tracefs offsets,
//! record decoding, feature probes.
pub mod btf;
pub mod grants;
pub mod probe;
pub mod records;
pub mod tracefs;

use std::{fs::File, path::Path};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSockAddr, TracePoint},
};
use enforcer_common::counter;

/// The eBPF object built by `cargo xtask build`, embedded by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer.bpf.o"));

/// Lineage programs: (program, tracepoint category, tracepoint name).
/// No syscalls/* tracepoint on purpose: attaching one puts every syscall of every process
/// on the slow tracing path.
const TRACEPOINTS: [(&str, &str, &str); 3] = [
    ("task_newtask", "task", "task_newtask"),
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];

/// Connect programs, attached to `cgroup_root`.
const SOCK_ADDR: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];

pub struct Kernel {
    ebpf: Ebpf,
    /// Names of the programs attached, for `status`.
    pub attached: Vec<String>,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counters {
    pub ringbuf_drops: u64,
    pub events: u64,
}

pub fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!("this enforcer binary was built without its eBPF object; build it with `cargo xtask build`");
    }
    Ok(OBJECT)
}

impl Kernel {
    /// Loads the object with this kernel's tracepoint offsets, attaches the lineage
    /// tracepoints (host-wide) and the connect hooks on `cgroup_root`.
    pub fn load(cgroup_root: &Path) -> Result<(Kernel, RingBuf<MapData>)> {
        let object = object()?;
        let tfs = tracefs::ensure_mounted()?;
        let off = |cat: &str, name: &str, field: &str| tracefs::required_offset(&tfs, cat, name, field);
        let newtask_pid = off("task", "task_newtask", "pid")?;
        let newtask_flags = off("task", "task_newtask", "clone_flags")?;
        let exec_filename = off("sched", "sched_process_exec", "filename")?;
        let exec_old_pid = off("sched", "sched_process_exec", "old_pid")?;
        let exit_group_dead = tracefs::field_offset(&tfs, "sched", "sched_process_exit", "group_dead")?.unwrap_or(0);
        let btf = btf::KernelBtf::load()?;
        let task_mm = btf.offset("task_struct", "mm")?;
        let mm_arg_start = btf.offset("mm_struct", "arg_start")?;
        let mm_arg_end = btf.offset("mm_struct", "arg_end")?;

        let mut ebpf = EbpfLoader::new()
            .override_global("NEWTASK_PID_OFF", &newtask_pid, true)
            .override_global("NEWTASK_FLAGS_OFF", &newtask_flags, true)
            .override_global("EXEC_FILENAME_OFF", &exec_filename, true)
            .override_global("EXEC_OLD_PID_OFF", &exec_old_pid, true)
            .override_global("EXIT_GROUP_DEAD_OFF", &exit_group_dead, true)
            .override_global("TASK_MM_OFF", &task_mm, true)
            .override_global("MM_ARG_START_OFF", &mm_arg_start, true)
            .override_global("MM_ARG_END_OFF", &mm_arg_end, true)
            .load(object)
            .context("load the eBPF object (maps and globals)")?;

        let mut attached = Vec::new();
        for (prog, category, name) in TRACEPOINTS {
            let p: &mut TracePoint = ebpf
                .program_mut(prog)
                .with_context(|| format!("program {prog} missing from the eBPF object"))?
                .try_into()?;
            p.load().with_context(|| format!("load program {prog} (tracepoint)"))?;
            p.attach(category, name).with_context(|| format!("attach program {prog} to tracepoint {category}/{name}"))?;
            attached.push(format!("tracepoint/{category}/{name}"));
        }
        let cgroup = File::open(cgroup_root).with_context(|| format!("open cgroup_root {}", cgroup_root.display()))?;
        for prog in SOCK_ADDR {
            let p: &mut CgroupSockAddr = ebpf
                .program_mut(prog)
                .with_context(|| format!("program {prog} missing from the eBPF object"))?
                .try_into()?;
            p.load().with_context(|| format!("load program {prog} (cgroup_sock_addr)"))?;
            // Attached through a bpf_link, which always coexists with other programs on the
            // cgroup (the kernel refuses BPF_F_ALLOW_MULTI on link_create: flags must be 0).
            p.attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attach program {prog} to cgroup {}", cgroup_root.display()))?;
            attached.push(format!("cgroup_sock_addr/{prog}"));
        }
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS missing")?)?;
        Ok((Kernel { ebpf, attached }, ring))
    }

    /// Takes the grant maps out of the object, for the mint's registry.
    pub fn grant_maps(&mut self) -> Result<grants::GrantMaps> {
        grants::GrantMaps::take(&mut self.ebpf)
    }

    pub fn counters(&self) -> Counters {
        let Some(map) = self.ebpf.map("COUNTERS") else { return Counters::default() };
        let Ok(arr) = PerCpuArray::<_, u64>::try_from(map) else { return Counters::default() };
        let sum = |i: u32| arr.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
        Counters { ringbuf_drops: sum(counter::RINGBUF_DROPS), events: sum(counter::EVENTS) }
    }
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
