//! `cargo xtask test [--fuzz-secs N] [--kernel K] [-- ARGS...]`: lint (fast fail), build, every
//! workspace test one thread at a time (the integration tests share the kernel; ARGS go to the
//! test harness), the guest suite inside each kernel of the QEMU matrix, then each fuzz target
//! for a bounded time. `--kernel 6.1` / `--kernel 6.12` builds and runs that kernel's guest
//! suite only; `--kernel none` skips the matrix.

use crate::matrix::{self, KernelChoice};
use crate::{build, cmd, fuzz, lint, root, run_step};
use anyhow::Result;
use std::time::Instant;

/// Default seconds per fuzz target in `test`.
pub const FUZZ_SECS: u64 = 60;

pub fn run(args: &[String], fuzz_secs: u64, kernel: KernelChoice) -> Result<()> {
    let t0 = Instant::now();
    let mut times: Vec<(&str, f64)> = Vec::new();
    let mut timed = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| {
        let t = Instant::now();
        let r = f();
        times.push((name, t.elapsed().as_secs_f64()));
        r
    };
    let host_suite = matches!(kernel, KernelChoice::All | KernelChoice::None);
    let result = (|| {
        if host_suite {
            timed("lint", &mut lint::run)?;
        } else {
            let name =
                clap::ValueEnum::to_possible_value(&kernel).map(|v| v.get_name().to_string());
            println!(
                "test: --kernel {}: the guest suite on that kernel only (no lint, host suite or fuzz)",
                name.unwrap_or_default()
            );
        }
        let mut built = None;
        timed("build", &mut || {
            built = Some(build::run(true)?);
            Ok(())
        })?;
        let built = built.expect("build ran");
        if host_suite {
            timed("cargo test", &mut || {
                let mut c = cmd("cargo");
                c.current_dir(root())
                    .env("ENFORCER_BIN", &built.enforcer)
                    .env("ENFORCER_BPF_OBJ", &built.bpf_obj)
                    .args(["test", "--release", "--workspace", "--", "--test-threads=1"])
                    .args(args);
                run_step("test: cargo test", &mut c)
            })?;
        }
        let series = kernel.series();
        if series.is_empty() {
            println!("test: kernel matrix skipped (--kernel none)");
        } else {
            timed("kernel matrix", &mut || matrix::run(&series, args, &built))?;
        }
        if host_suite && fuzz_secs > 0 {
            timed("fuzz", &mut || fuzz::smoke(fuzz_secs))?;
        } else if host_suite {
            println!("test: fuzz runs skipped (--fuzz-secs 0)");
        }
        Ok(())
    })();
    let secs = t0.elapsed().as_secs_f64();
    let steps: Vec<String> = times.iter().map(|(n, s)| format!("{n} {s:.0}s")).collect();
    match &result {
        Ok(()) => println!("test: all passed, total {secs:.1}s ({})", steps.join(", ")),
        Err(_) => println!("test: FAILED after {secs:.1}s ({})", steps.join(", ")),
    }
    result
}
