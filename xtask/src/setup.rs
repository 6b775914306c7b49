//! `cargo xtask setup`: rust-src, clippy and rustfmt (nightly and stable), a cached bpf-linker
//! built on the nightly's own libLLVM, the tools the integration tests call, and the kernel
//! matrix's host tools and guest kernels (`matrix::setup`). Idempotent; a second run only checks.

use crate::{cmd, on_path, output_step, run_step};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::Instant;

const BPF_LINKER_VERSION: &str = "0.13.0";

/// What later steps need from setup.
pub struct Setup {
    /// Directory holding `bpf-linker`, to prefix PATH with.
    pub linker_bin: PathBuf,
}

/// `cargo xtask setup`: the build's needs, then the kernel matrix's (host tools, kernels).
pub fn run_all() -> Result<()> {
    run()?;
    let t0 = Instant::now();
    let kernels = crate::matrix::setup()?;
    for k in &kernels {
        println!(
            "setup: guest kernel {}: {} {} ({})",
            k.series.name, k.package, k.version, k.release
        );
    }
    println!("setup: kernel matrix ready in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

pub fn run() -> Result<Setup> {
    let t0 = Instant::now();
    components()?;
    let linker_bin = bpf_linker()?;
    test_tools()?;
    python_test_packages()?;
    python_clients()?;
    resolved_test_packages()?;
    println!("setup: done in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(Setup { linker_bin })
}

/// Components the build and the lint gates need: rust-src (eBPF build-std), clippy and rustfmt
/// for nightly; clippy and rustfmt for the toolchain that builds userspace (the active one in
/// the repository root, stable).
pub fn components() -> Result<()> {
    toolchain_components(Some("nightly"), &["rust-src", "clippy", "rustfmt"])?;
    toolchain_components(None, &["clippy", "rustfmt"])
}

fn toolchain_components(toolchain: Option<&str>, wanted: &[&str]) -> Result<()> {
    let name = toolchain.unwrap_or("active toolchain");
    let with_toolchain = |c: &mut std::process::Command| {
        c.current_dir(crate::root());
        if let Some(t) = toolchain {
            c.args(["--toolchain", t]);
        }
    };
    let mut c = cmd("rustup");
    c.args(["component", "list", "--installed"]);
    with_toolchain(&mut c);
    let installed = output_step(&format!("setup: list {name} components"), &mut c)?;
    // Installed components are listed with their target: "clippy-x86_64-unknown-linux-gnu".
    let has = |comp: &str| {
        installed.lines().map(str::trim).any(|l| l == comp || l.starts_with(&format!("{comp}-")))
    };
    let missing: Vec<&str> = wanted.iter().copied().filter(|c| !has(c)).collect();
    if missing.is_empty() {
        println!("setup: {} for {name} already installed", wanted.join(", "));
        return Ok(());
    }
    let mut c = cmd("rustup");
    c.args(["component", "add"]).args(&missing);
    with_toolchain(&mut c);
    run_step(&format!("setup: install {} for {name}", missing.join(", ")), &mut c)?;
    println!("setup: installed {} for {name}", missing.join(", "));
    Ok(())
}

/// Cache root: $ENFORCER_CACHE, else $XDG_CACHE_HOME/enforcer, else $HOME/.cache/enforcer.
pub fn cache_root() -> Result<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = nonempty("ENFORCER_CACHE") {
        return Ok(p);
    }
    if let Some(p) = nonempty("XDG_CACHE_HOME") {
        return Ok(p.join("enforcer"));
    }
    let home = nonempty("HOME")
        .context("setup: neither ENFORCER_CACHE, XDG_CACHE_HOME nor HOME is set")?;
    Ok(home.join(".cache").join("enforcer"))
}

/// LLVM major version of the nightly rustc ("LLVM version: 22.1.4" -> "22").
fn nightly_llvm_major() -> Result<String> {
    let vv = output_step("setup: query nightly rustc", cmd("rustc").args(["+nightly", "-vV"]))?;
    let ver = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .context("setup: `rustc +nightly -vV` printed no \"LLVM version:\" line")?;
    let major = ver.trim().split('.').next().unwrap_or_default();
    if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
        bail!("setup: cannot parse LLVM version {ver:?} from `rustc +nightly -vV`");
    }
    Ok(major.to_string())
}

fn bpf_linker() -> Result<PathBuf> {
    let major = nightly_llvm_major()?;
    let cache = cache_root()?;
    let root = cache.join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm{major}"));
    let bin = root.join("bin");
    let linker = bin.join("bpf-linker");
    if linker.is_file() {
        let mut c = cmd(linker.to_str().unwrap_or("bpf-linker"));
        c.arg("--version");
        match c.output() {
            Ok(o) if o.status.success() => {
                let v = String::from_utf8_lossy(&o.stdout);
                println!("setup: cached {} works ({})", linker.display(), v.trim());
                return Ok(bin);
            }
            Ok(o) => println!(
                "setup: cached {} does not run ({}): rebuilding\n{}",
                linker.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim_end()
            ),
            Err(e) => println!("setup: cached {} does not run ({e}): rebuilding", linker.display()),
        }
    }

    // The nightly's own libLLVM, exposed as an LLVM_PREFIX with lib/libLLVM.so + soname file.
    let sysroot = output_step(
        "setup: query nightly sysroot",
        cmd("rustc").args(["+nightly", "--print", "sysroot"]),
    )?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let prefix = format!("libLLVM.so.{major}.");
    let soname = std::fs::read_dir(&sysroot_lib)
        .with_context(|| format!("setup: cannot read {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&prefix))
        .with_context(|| format!("setup: no {prefix}* in {}", sysroot_lib.display()))?;
    let target = sysroot_lib.join(&soname);
    let llvm = cache.join(format!("llvm-{major}"));
    let llvm_lib = llvm.join("lib");
    std::fs::create_dir_all(&llvm_lib)
        .with_context(|| format!("setup: cannot create {}", llvm_lib.display()))?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = llvm_lib.join(name);
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link)
                .with_context(|| format!("setup: cannot replace {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&target, &link).with_context(|| {
            format!("setup: cannot link {} -> {}", link.display(), target.display())
        })?;
        println!("setup: {} -> {}", link.display(), target.display());
    }

    // Build into a temporary root, rename when complete: an interrupted build leaves no cache.
    let tmp = cache
        .join(format!(".bpf-linker-{BPF_LINKER_VERSION}-llvm{major}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let t0 = Instant::now();
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (several minutes, once)"
    );
    let result = run_step(
        "setup: build bpf-linker",
        cmd("cargo")
            .env("LLVM_PREFIX", &llvm)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")])
            .arg("--root")
            .arg(&tmp),
    );
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .with_context(|| format!("setup: cannot remove stale {}", root.display()))?;
    }
    std::fs::rename(&tmp, &root)
        .with_context(|| format!("setup: cannot move {} to {}", tmp.display(), root.display()))?;
    run_step(
        "setup: check bpf-linker",
        cmd(linker.to_str().unwrap_or("bpf-linker")).arg("--version"),
    )?;
    println!("setup: built {} in {:.0}s", linker.display(), t0.elapsed().as_secs_f64());
    Ok(bin)
}

/// Tools the integration tests call: installed with apt only in CI, otherwise reported.
fn test_tools() -> Result<()> {
    // systemd-analyze: the unit-file verification in tests/deploy.rs must run in CI, not skip.
    let wanted = [
        ("curl", "curl"),
        ("python3", "python3"),
        ("ip", "iproute2"),
        ("systemd-analyze", "systemd"),
        ("dpkg-deb", "dpkg-dev"),
    ];
    let missing: Vec<_> = wanted.iter().filter(|(bin, _)| on_path(bin).is_none()).collect();
    if missing.is_empty() {
        println!("setup: test tools present (curl, python3, ip)");
        return Ok(());
    }
    let bins: Vec<_> = missing.iter().map(|(b, _)| *b).collect();
    let pkgs: Vec<_> = missing.iter().map(|(_, p)| *p).collect();
    if std::env::var_os("CI").is_none_or(|v| v.is_empty()) {
        println!(
            "setup: missing test tools: {} (install: apt-get install -y {}); integration tests that need them will fail",
            bins.join(", "),
            pkgs.join(" ")
        );
        return Ok(());
    }
    run_step("setup: apt-get update", cmd("apt-get").arg("update"))?;
    run_step(
        "setup: install test tools",
        cmd("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y"]).args(&pkgs),
    )?;
    println!("setup: installed {}", pkgs.join(" "));
    Ok(())
}

/// Python packages tests/aws.rs drives: boto3 (the client) and moto's server mode (a real
/// local STS). Installed with pip only in CI, otherwise reported.
fn python_test_packages() -> Result<()> {
    let present = cmd("python3")
        .args(["-c", "import boto3, moto.server"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        println!("setup: python test packages present (boto3, moto[server])");
        return Ok(());
    }
    if std::env::var_os("CI").is_none_or(|v| v.is_empty()) {
        println!(
            "setup: missing python test packages (install: python3 -m pip install boto3 'moto[server]'); tests/aws.rs will skip"
        );
        return Ok(());
    }
    run_step(
        "setup: pip install boto3 moto[server]",
        cmd("python3").args(["-m", "pip", "install", "--quiet", "boto3", "moto[server]"]),
    )?;
    Ok(())
}

/// Independent clients tests/spiffe.rs drives, from PyPI (module, pinned requirement): py-spiffe
/// (the SPIFFE Workload API client, with grpcio) and PyJWT (OIDC verification). Installed with
/// pip only in CI, otherwise reported.
const PY_CLIENTS: &[(&str, &str)] = &[("spiffe", "spiffe==0.3.2"), ("jwt", "pyjwt==2.15.1")];

fn python_clients() -> Result<()> {
    let missing: Vec<&str> = PY_CLIENTS
        .iter()
        .filter(|(module, _)| {
            !cmd("python3")
                .args(["-c", &format!("import {module}")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, req)| *req)
        .collect();
    if missing.is_empty() {
        println!("setup: python test clients present (spiffe, jwt)");
        return Ok(());
    }
    if std::env::var_os("CI").is_none_or(|v| v.is_empty()) {
        println!(
            "setup: missing python test clients (install: python3 -m pip install {}); tests/spiffe.rs will skip",
            missing.join(" ")
        );
        return Ok(());
    }
    run_step(
        "setup: install python test clients",
        cmd("python3").args(["-m", "pip", "install", "--quiet"]).args(&missing),
    )
}

/// Where tests/dns_resolved.rs finds systemd-resolved and libnss-resolve of this host's systemd
/// version, unpacked (never installed: the host keeps its own resolver configuration).
pub const RESOLVED_CACHE: &str = "/var/cache/enforcer-tests";

/// systemd-resolved and libnss-resolve of the installed systemd's version, fetched with
/// `apt-get download` and unpacked under [`RESOLVED_CACHE`] for tests/dns_resolved.rs's second
/// part (a real resolved in a private mount namespace). Fetched only in CI, otherwise reported;
/// an archive that no longer carries that version is reported and the test says why it skips.
fn resolved_test_packages() -> Result<()> {
    let Ok(out) = cmd("dpkg-query").args(["-W", "-f=${Version}", "systemd"]).output() else {
        println!("setup: no dpkg-query: systemd-resolved test packages not fetched");
        return Ok(());
    };
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || version.is_empty() {
        println!(
            "setup: systemd is not a Debian package here: systemd-resolved test packages not fetched"
        );
        return Ok(());
    }
    let dir = Path::new(RESOLVED_CACHE).join(format!("resolved-{version}"));
    if dir.join(".complete").exists() {
        println!("setup: systemd-resolved {version} test packages present ({})", dir.display());
        return Ok(());
    }
    let pkgs = [format!("systemd-resolved={version}"), format!("libnss-resolve={version}")];
    if std::env::var_os("CI").is_none_or(|v| v.is_empty()) {
        println!(
            "setup: systemd-resolved test packages missing (CI=1 cargo xtask setup fetches {}); tests/dns_resolved.rs part 2 will skip",
            pkgs.join(" ")
        );
        return Ok(());
    }
    let dl = Path::new(RESOLVED_CACHE).join(format!("download-{}", std::process::id()));
    std::fs::create_dir_all(&dl).with_context(|| format!("setup: create {}", dl.display()))?;
    let got = cmd("apt-get").current_dir(&dl).args(["download", "-q"]).args(&pkgs).output();
    match got {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "setup: apt-get download {} failed ({}); tests/dns_resolved.rs part 2 will skip",
                pkgs.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            let _ = std::fs::remove_dir_all(&dl);
            return Ok(());
        }
        Err(e) => bail!("setup: apt-get download: {e}"),
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("setup: create {}", dir.display()))?;
    for deb in std::fs::read_dir(&dl)?.flatten() {
        run_step("setup: unpack", cmd("dpkg-deb").arg("-x").arg(deb.path()).arg(&dir))?;
    }
    std::fs::remove_dir_all(&dl)?;
    std::fs::write(dir.join(".complete"), &version)?;
    println!("setup: systemd-resolved {version} test packages unpacked in {}", dir.display());
    Ok(())
}
