//! One guest: boot a kernel under QEMU (TCG: KVM does not run stock kernels on these machines)
//! with the host root shared read-only and a read-write results directory, run the test
//! binaries inside, collect each one's output and exit code from the results directory.
//! Two bounds: each binary runs under `timeout` in the guest, and the whole guest is killed by
//! the host after `host_limit` (reported as hung, with the console tail).

use super::initramfs::RESULTS_MOUNT;
use super::kernels::Kernel;
use anyhow::{Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The script (in the results share) the initramfs switch_roots into: guest PID 1.
pub const GUEST_SCRIPT: &str = "guest.sh";

/// Seconds one test binary may run inside the guest before `timeout` kills it.
pub const BINARY_LIMIT_S: u64 = 420;
/// Exit code of a program `timeout` killed.
pub const TIMED_OUT: i32 = 124;
/// Seconds a guest may take to boot to its script and to power off.
const BOOT_AND_SHUTDOWN_S: u64 = 150;

/// `tsc=reliable`: under TCG the guest's TSC sync check fails ("TSCs unsynchronized") and
/// the kernel falls back to the HPET, whose every read is an emulated MMIO access costing
/// tens of microseconds: each `bpf_ktime_get_boot_ns` of a judged open or connect then
/// dominates what the guest measures. Fleet machines (hardware, KVM) keep the TSC (or
/// kvm-clock), so the guest keeps it too.
const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 rdinit=/init loglevel=4 tsc=reliable";

const VCPUS: &str = "2";
const MEMORY_MIB: &str = "1536";

/// A program to run inside the guest: a test binary of the matrix, or the guest bench.
pub struct GuestTest {
    pub name: String,
    pub exe: PathBuf,
    /// Its whole argument list.
    pub args: Vec<String>,
    /// Seconds it may run before the guest's `timeout` kills it.
    pub limit_s: u64,
}

/// What one test binary did in the guest.
pub struct BinaryRun {
    pub name: String,
    /// Exit code; None: it never finished (guest hung or died).
    pub code: Option<i32>,
    pub secs: Option<f64>,
    pub log: String,
}

/// What one guest did.
pub struct GuestRun {
    /// `uname -r` in the guest.
    pub uname: Option<String>,
    /// Seconds from QEMU start to the guest script running.
    pub boot_s: Option<f64>,
    pub total_s: f64,
    /// Killed by the host after the limit.
    pub hung: bool,
    pub runs: Vec<BinaryRun>,
    pub console: PathBuf,
}

impl GuestRun {
    pub fn console_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Single-quotes `s` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Guest PID 1 after switch_root: the mounts the daemon and the tests need, loopback up,
/// scratch on tmpfs (/var/tmp; /tmp too unless the workspace is under it), each program run
/// in turn under its own `timeout`, then power off.
fn guest_script(tests: &[GuestTest], env: &[(String, String)], cwd: &Path) -> String {
    let cwd_q = quote(&cwd.display().to_string());
    let mut s = format!(
        r#"#!/bin/sh
# enforcer kernel matrix, stage 2 (guest PID 1), written by `cargo xtask test`.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
R={RESULTS_MOUNT}
date +%s.%N > $R/booted
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# Scratch on tmpfs, but never over the workspace or the binaries under test: a checkout
# under /tmp (a CI clone) must stay visible, read-only, through the host root.
case {cwd_q} in /tmp|/tmp/*) ;; *) mount -t tmpfs -o mode=1777 tmpfs /tmp ;; esac
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mount -t securityfs securityfs /sys/kernel/security
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
uname -r > $R/uname
cat /sys/kernel/security/lsm > $R/lsm 2>/dev/null
export HOME=/var/tmp TMPDIR=/var/tmp RUST_BACKTRACE=1 PYTHONDONTWRITEBYTECODE=1
cd {cwd_q}
"#
    );
    for (k, v) in env {
        s += &format!("export {k}={}\n", quote(v));
    }
    for t in tests {
        let n = &t.name;
        let args: String = t.args.iter().map(|a| format!(" {}", quote(a))).collect();
        s += &format!(
            "echo \"enforcer-matrix: running {n}\" > /dev/console\n\
             date +%s.%N > $R/{n}.start\n\
             timeout -k 10 {} {}{args} > $R/{n}.log 2>&1\n\
             echo $? > $R/{n}.rc\n\
             date +%s.%N > $R/{n}.end\n",
            t.limit_s,
            quote(&t.exe.display().to_string())
        );
    }
    s += "sync\necho done > $R/done\nsync\nbusybox poweroff -f\nsleep 30\n";
    s
}

/// How the guest's CPU and clock are emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// Two vCPUs (multi-threaded TCG), the guest's clock following the host's: the test suite.
    Host,
    /// One vCPU whose clock counts the instructions it executed (`-icount shift=0,sleep=off`:
    /// 1 ns per guest instruction; an idle guest skips to its next timer). Every time the guest
    /// measures is then a count of its own instructions, whatever else the host runs: the
    /// bench. One vCPU, because with two the clock also advances while the other vCPU runs.
    Instructions,
}

/// Boots `kernel`, runs `tests` (with `env`), collects the results in `out_dir` (emptied
/// first).
pub fn run(
    qemu: &Path,
    kernel: &Kernel,
    tests: &[GuestTest],
    env: &[(String, String)],
    out_dir: &Path,
) -> Result<GuestRun> {
    run_with(qemu, kernel, tests, env, out_dir, Clock::Host)
}

/// `run` with the guest's clock chosen.
pub fn run_with(
    qemu: &Path,
    kernel: &Kernel,
    tests: &[GuestTest],
    env: &[(String, String)],
    out_dir: &Path,
    clock: Clock,
) -> Result<GuestRun> {
    let _ = std::fs::remove_dir_all(out_dir);
    let results = out_dir.join("share");
    std::fs::create_dir_all(&results)
        .with_context(|| format!("matrix: cannot create {}", results.display()))?;
    let script = results.join(GUEST_SCRIPT);
    std::fs::write(&script, guest_script(tests, env, &crate::root()))
        .with_context(|| format!("matrix: cannot write {}", script.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    }
    let console = out_dir.join("console.log");
    let qemu_log = out_dir.join("qemu.log");
    let mut c = Command::new(qemu);
    let vcpus = match clock {
        Clock::Host => VCPUS,
        Clock::Instructions => {
            c.args(["-icount", "shift=0,sleep=off"]);
            "1"
        }
    };
    c.args(["-accel", "tcg", "-cpu", "max", "-smp", vcpus, "-m", MEMORY_MIB])
        .args(["-nographic", "-nodefaults", "-no-reboot", "-nic", "none", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&kernel.initramfs)
        .args(["-append", KERNEL_CMDLINE])
        .args([
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev",
        ])
        .arg(format!("local,id=results,path={},security_model=none", results.display()))
        .args(["-device", "virtio-9p-pci,fsdev=results,mount_tag=results"])
        .stdin(Stdio::null())
        .stdout(File::create(&qemu_log)?)
        .stderr(File::create(out_dir.join("qemu.err"))?);
    println!("$ {}", crate::show(&c));
    let limit = Duration::from_secs(
        BOOT_AND_SHUTDOWN_S + tests.iter().map(|t| t.limit_s + 10).sum::<u64>(),
    );
    let t0 = Instant::now();
    let mut child =
        c.spawn().with_context(|| format!("matrix: cannot start {}", qemu.display()))?;
    let mut boot_s = None;
    let mut hung = false;
    // Bounded: one poll per 100 ms until QEMU exits or the limit passes.
    loop {
        if boot_s.is_none() && results.join("booted").exists() {
            boot_s = Some(t0.elapsed().as_secs_f64());
            println!("matrix: {} booted to its script in {:.1}s", kernel.release, boot_s.unwrap());
        }
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                println!("matrix: qemu exited with {status}");
            }
            break;
        }
        if t0.elapsed() > limit {
            hung = true;
            let _ = child.kill();
            let _ = child.wait();
            println!("matrix: guest {} killed after {}s (limit)", kernel.release, limit.as_secs());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let total_s = t0.elapsed().as_secs_f64();
    let read =
        |f: &str| std::fs::read_to_string(results.join(f)).ok().map(|s| s.trim().to_string());
    let runs = tests
        .iter()
        .map(|t| {
            let n = &t.name;
            let time = |f: &str| read(&format!("{n}.{f}")).and_then(|s| s.parse::<f64>().ok());
            BinaryRun {
                name: n.clone(),
                code: read(&format!("{n}.rc")).and_then(|s| s.parse().ok()),
                secs: time("start").zip(time("end")).map(|(a, b)| b - a),
                log: read(&format!("{n}.log")).unwrap_or_default(),
            }
        })
        .collect();
    let qemu_err = std::fs::read_to_string(out_dir.join("qemu.err")).unwrap_or_default();
    if !qemu_err.trim().is_empty() {
        println!("matrix: qemu stderr:\n{}", qemu_err.trim_end());
    }
    Ok(GuestRun { uname: read("uname"), boot_s, total_s, hung, runs, console })
}
