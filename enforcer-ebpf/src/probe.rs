//! Tiny programs that `enforcer doctor` and the daemon load only to learn what this host
//! allows (a real BPF_PROG_LOAD, not a guess from config files). They do nothing.
use aya_ebpf::{
    macros::{btf_tracepoint, fentry, lsm},
    programs::{BtfTracePointContext, FEntryContext, LsmContext},
};

#[lsm(hook = "file_open")]
pub fn probe_lsm_file_open(_ctx: LsmContext) -> i32 {
    0
}

#[fentry(function = "do_sys_openat2")]
pub fn probe_fentry(_ctx: FEntryContext) -> u32 {
    0
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn probe_tp_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}
