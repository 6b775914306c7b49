//! `cargo xtask lint` (also the first step of `cargo xtask test`): formatting and clippy for
//! every crate, warnings as errors. Checks only; nothing is rewritten.
//!
//! - `cargo fmt --all --check` (root workspace, stable) and `cargo +nightly fmt --check` in the
//!   two nightly workspaces (enforcer-ebpf, fuzz);
//! - `cargo clippy --workspace --all-targets -- -D warnings` (userspace, stable);
//! - clippy for the eBPF crate with the same target and flags as `build::ebpf`;
//! - the fuzz workspace's Cargo.lock is current and its targets compile (its build runs
//!   `--locked` at the end of `test`: a library dependency or a new `Record` variant without
//!   them failed CI there, 20 minutes in).
//!
//! Every gate runs even after one fails, so one run lists everything to fix.

use crate::{cmd, root, run_step, setup};
use anyhow::{Result, bail};
use std::process::Command;
use std::time::Instant;

pub fn run() -> Result<()> {
    let t0 = Instant::now();
    // A fresh machine may lack clippy/rustfmt; lint runs before `build` (which runs all of setup).
    setup::components()?;
    let r = root();
    let mut gates: Vec<(&str, Command)> = Vec::new();

    let mut c = cmd("cargo");
    c.current_dir(&r).args(["fmt", "--all", "--check"]);
    gates.push(("lint: rustfmt (workspace)", c));
    for dir in ["enforcer-ebpf", "fuzz"] {
        let mut c = cmd("cargo");
        c.current_dir(r.join(dir)).args(["+nightly", "fmt", "--check"]);
        gates
            .push((if dir == "fuzz" { "lint: rustfmt (fuzz)" } else { "lint: rustfmt (eBPF)" }, c));
    }

    let mut c = cmd("cargo");
    c.current_dir(&r).args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    gates.push(("lint: clippy (userspace)", c));

    // As build::ebpf, minus the link (clippy stops before it, so no bpf-linker is needed).
    let mut c = cmd("cargo");
    c.current_dir(r.join("enforcer-ebpf")).env_remove("RUSTFLAGS").args([
        "+nightly",
        "clippy",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
        "--release",
        "--",
        "-D",
        "warnings",
    ]);
    gates.push(("lint: clippy (eBPF)", c));

    let mut c = cmd("cargo");
    c.current_dir(r.join("fuzz")).args([
        "+nightly",
        "metadata",
        "--locked",
        "--format-version",
        "1",
    ]);
    c.stdout(std::process::Stdio::null());
    gates.push(("lint: fuzz/Cargo.lock is current", c));
    let mut c = cmd("cargo");
    c.current_dir(r.join("fuzz")).args(["+nightly", "check", "--bins", "--locked"]);
    gates.push(("lint: fuzz targets compile", c));

    let mut failed = Vec::new();
    for (step, mut c) in gates {
        let t = Instant::now();
        match run_step(step, &mut c) {
            Ok(()) => println!("{step}: ok ({:.1}s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                eprintln!("xtask: {e:#}");
                failed.push(step);
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if !failed.is_empty() {
        bail!("{} lint gate(s) failed after {secs:.1}s: {}", failed.len(), failed.join("; "));
    }
    println!("lint: all gates passed ({secs:.1}s)");
    Ok(())
}
