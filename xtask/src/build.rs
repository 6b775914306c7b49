//! `cargo xtask build`: the eBPF object (nightly, separate workspace), then the enforcer binary
//! that embeds it (its build.rs reads ENFORCER_BPF_OBJ).

use crate::{cmd, root, run_step, setup};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::time::Instant;

/// Paths produced by a build.
pub struct Built {
    /// The eBPF ELF object.
    pub bpf_obj: PathBuf,
    /// The enforcer binary.
    pub enforcer: PathBuf,
}

pub fn run(release: bool) -> Result<Built> {
    let setup = setup::run()?;
    let bpf_obj = ebpf(&setup)?;
    let enforcer = userspace(&bpf_obj, release)?;
    Ok(Built { bpf_obj, enforcer })
}

fn ebpf(setup: &setup::Setup) -> Result<PathBuf> {
    let dir = root().join("enforcer-ebpf");
    let mut path =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect::<Vec<_>>();
    path.insert(0, setup.linker_bin.clone());
    let path = std::env::join_paths(path)
        .context("build: cannot form PATH with the bpf-linker directory")?;
    let t0 = Instant::now();
    let mut c = cmd("cargo");
    c.current_dir(&dir)
        // Host RUSTFLAGS (e.g. target-cpu) must not leak into the BPF target.
        .env_remove("RUSTFLAGS")
        .env("PATH", path)
        .args([
            "+nightly",
            "build",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
            "--release",
        ]);
    run_step("build: eBPF object (enforcer-ebpf, nightly)", &mut c)?;
    let obj = dir.join("target/bpfel-unknown-none/release/enforcer");
    if !obj.is_file() {
        bail!("build: eBPF build succeeded but {} is missing", obj.display());
    }
    println!("build: eBPF object {} ({:.1}s)", obj.display(), t0.elapsed().as_secs_f64());
    Ok(obj)
}

fn userspace(bpf_obj: &std::path::Path, release: bool) -> Result<PathBuf> {
    let t0 = Instant::now();
    let mut c = cmd("cargo");
    c.current_dir(root()).env("ENFORCER_BPF_OBJ", bpf_obj).args(["build", "-p", "enforcer"]);
    if release {
        c.arg("--release");
    }
    run_step("build: enforcer binary", &mut c)?;
    let bin =
        root().join("target").join(if release { "release" } else { "debug" }).join("enforcer");
    if !bin.is_file() {
        bail!("build: enforcer build succeeded but {} is missing", bin.display());
    }
    println!("build: {} ({:.1}s)", bin.display(), t0.elapsed().as_secs_f64());
    Ok(bin)
}
