//! Developer tasks: `cargo xtask setup|build|run|lint|test|fuzz|bench`.
//!
//! Every external command is printed before it runs; every failure names the step that failed.

mod bench;
mod build;
mod fuzz;
mod lint;
mod matrix;
mod run;
mod setup;
mod test;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(name = "xtask", about = "enforcer developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build needs (rust-src, clippy, rustfmt, cached bpf-linker, test tools)
    /// and what the kernel matrix needs (qemu, busybox-static, the guest kernels). Idempotent.
    Setup,
    /// Build the eBPF object and the enforcer binary (target/release/enforcer).
    Build {
        /// Build the userspace binary without --release (target/debug/enforcer).
        #[arg(long)]
        debug: bool,
    },
    /// Build, then run `enforcer daemon ARGS...` as root.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// rustfmt and clippy (-D warnings) on every crate, userspace and eBPF. Checks only.
    Lint,
    /// Lint, build, run every workspace test (ARGS go to the test harness, e.g. a name filter),
    /// then the guest suite inside each kernel of the QEMU matrix, then run each fuzz target
    /// for a bounded time on a copy of its seed corpus.
    Test {
        /// Seconds per fuzz target (0 skips the fuzz runs).
        #[arg(long, default_value_t = test::FUZZ_SECS)]
        fuzz_secs: u64,
        /// Guest kernels: `all` (host suite, then every kernel), `none` (host suite only), or
        /// one series (`6.1`, `6.12`: that kernel's guest suite only).
        #[arg(long, value_enum, default_value = "all")]
        kernel: matrix::KernelChoice,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the fuzz targets (nightly, libFuzzer) and run each for a while on a corpus kept in
    /// fuzz/target/corpus/ (seeded from fuzz/corpus/). Crashes land in fuzz/artifacts/.
    Fuzz {
        /// Minutes per target.
        #[arg(long, default_value_t = 5)]
        minutes: u64,
        /// Run only this target (default: all of fuzz/fuzz_targets/).
        target: Option<String>,
    },
    /// Build, then measure the daemon's overhead and ring-buffer drops (writes target/bench.md);
    /// with `--kernel`, the secret-open cost of each file backend and the connect and
    /// fork+exec ratios inside guest kernels under QEMU instead (writes target/bench-guest.md).
    Bench {
        /// Rounds with and without the daemon (each); default 7 on the host, 3 in a guest.
        #[arg(long)]
        iterations: Option<usize>,
        /// Only these rows: `mint` (grant issuance, JWT-SVID and AWS credential serving),
        /// `attack` (the daemon under attack: exec storm, RSS idle and through a soak), `dns`
        /// (the DNS stub), `kernel` (each kernel program's cost) or `alerts` (the alert stream).
        #[arg(long)]
        only: Option<String>,
        /// Measure inside these guest kernels (`6.1`, `6.12`, `all`) instead of on the host.
        #[arg(long, value_enum)]
        kernel: Option<bench::guest::GuestKernel>,
    },
    /// Internal: one measured loop, run by `bench` inside the bench cgroup.
    #[command(hide = true)]
    BenchWorker(bench::WorkerArgs),
    /// Internal: the guest side of `bench --kernel`, run inside the guest.
    #[command(hide = true)]
    BenchGuestInner(bench::guest::InnerArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::run_all(),
        Cmd::Build { debug } => build::run(!debug).map(|_| ()),
        Cmd::Run { args } => run::run(&args),
        Cmd::Lint => lint::run(),
        Cmd::Test { fuzz_secs, kernel, args } => test::run(&args, fuzz_secs, kernel),
        Cmd::Fuzz { minutes, target } => fuzz::run(minutes, target.as_deref()),
        Cmd::Bench { iterations, only, kernel: None } => {
            bench::run(iterations.unwrap_or(7), only.as_deref())
        }
        Cmd::Bench { iterations, only: _, kernel: Some(k) } => {
            bench::guest::run(k, iterations.unwrap_or(bench::guest::DEFAULT_ITERATIONS))
        }
        Cmd::BenchWorker(args) => bench::worker(&args),
        Cmd::BenchGuestInner(args) => bench::guest::inner(&args),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root (parent of xtask/).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf()
}

/// Environment that the outer `cargo run` (or rustup) sets and that would confuse a nested cargo.
const NESTED_ENV: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "RUSTUP_TOOLCHAIN",
    "CARGO",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_MAKEFLAGS",
    "OUT_DIR",
];

/// A command with a clean environment for nested cargo/rustc/rustup calls.
/// `cargo`, `rustc` and `rustup` resolve to the rustup proxies so `+nightly` works.
pub fn cmd(program: &str) -> Command {
    let resolved = match program {
        "cargo" | "rustc" | "rustup" => proxy(program),
        _ => PathBuf::from(program),
    };
    let mut c = Command::new(resolved);
    for k in NESTED_ENV {
        c.env_remove(k);
    }
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("CARGO_PKG_") || k.starts_with("CARGO_CFG_")) {
            c.env_remove(k);
        }
    }
    c
}

/// The rustup proxy for `name` ($CARGO_HOME/bin or ~/.cargo/bin), else `name` from PATH.
fn proxy(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    match home.map(|h| h.join("bin").join(name)) {
        Some(p) if p.is_file() => p,
        _ => PathBuf::from(name),
    }
}

/// Render a command for printing: env overrides, program and args.
pub fn show(c: &Command) -> String {
    let mut s = String::new();
    for (k, v) in c.get_envs() {
        if let Some(v) = v {
            let k = k.to_string_lossy();
            if k != "PATH" {
                s += &format!("{k}={} ", v.to_string_lossy());
            }
        }
    }
    if let Some(d) = c.get_current_dir() {
        s = format!("(cd {}) {s}", d.display());
    }
    // Rustup proxies print as their bare name (`cargo`), anything else with its full path.
    let prog = Path::new(c.get_program());
    match prog.file_name() {
        Some(n) if ["cargo", "rustc", "rustup"].iter().any(|p| n == *p) => {
            s += &n.to_string_lossy()
        }
        _ => s += &prog.to_string_lossy(),
    }
    for a in c.get_args() {
        s.push(' ');
        s += &a.to_string_lossy();
    }
    s
}

/// Print and run a command; error (naming `step`) unless it exits 0.
pub fn run_step(step: &str, c: &mut Command) -> Result<()> {
    println!("$ {}", show(c));
    let status = c.status().with_context(|| format!("{step}: cannot start `{}`", show(c)))?;
    if !status.success() {
        bail!("{step} failed ({status}): `{}`", show(c));
    }
    Ok(())
}

/// Print and run a command, returning its stdout; error (naming `step`) unless it exits 0.
pub fn output_step(step: &str, c: &mut Command) -> Result<String> {
    println!("$ {}", show(c));
    let out = c.output().with_context(|| format!("{step}: cannot start `{}`", show(c)))?;
    if !out.status.success() {
        bail!(
            "{step} failed ({}): `{}`\n{}",
            out.status,
            show(c),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `name` is an executable file on PATH.
pub fn on_path(name: impl AsRef<OsStr>) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name.as_ref())).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
