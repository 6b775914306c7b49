//! The guest kernels: Debian's current bookworm 6.1 and bookworm-backports 6.12 images,
//! resolved from the apt lists at run time (never a hard-coded ABI), downloaded with
//! `apt-get download`, unpacked with `dpkg-deb -x` (nothing installed into /boot) and cached
//! under `<cache>/kernels/<abi>/` with their initramfs. A cache entry is built in a temporary
//! directory and renamed into place when complete: an interrupted setup leaves no entry.

use super::host;
use super::initramfs;
use crate::{cmd, output_step, run_step};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A kernel series the matrix boots: the newest `linux-image-amd64` of this upstream series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Series {
    /// The name `--kernel` takes and the summary prints ("6.1").
    pub name: &'static str,
    /// Where Debian ships it (for messages).
    pub suite: &'static str,
}

/// Every series the matrix knows, in run order.
pub const SERIES: &[Series] = &[
    Series { name: "6.1", suite: "bookworm (+ bookworm-security)" },
    Series { name: "6.12", suite: "bookworm-backports" },
];

/// A resolved, cached kernel.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub series: Series,
    /// The image package (`linux-image-6.1.0-57-amd64`).
    pub package: String,
    /// The version of `linux-image-amd64` that depends on it (`6.1.192-3`).
    pub version: String,
    /// The kernel release `uname -r` prints in the guest (`6.1.0-57-amd64`).
    pub release: String,
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
}

const MANIFEST: &str = "manifest";

/// Resolves `series` from the apt lists and returns its cache entry, downloading and
/// unpacking it first when it is not cached yet. In CI, a failure with lists older than this
/// run (a superseded security kernel is gone from the archive) refreshes them and retries once.
pub fn ensure(series: Series) -> Result<Kernel> {
    match ensure_once(series) {
        Err(e) if host::may_install() && !host::apt_updated() => {
            println!("matrix: {e:#}\nmatrix: refreshing the apt lists and retrying once");
            host::apt_update("retry with fresh lists")?;
            ensure_once(series)
        }
        r => r,
    }
}

fn ensure_once(series: Series) -> Result<Kernel> {
    let (version, package) = resolve(series)?;
    let release = package
        .strip_prefix("linux-image-")
        .with_context(|| format!("matrix: unexpected kernel package name {package:?}"))?
        .to_string();
    let dir = kernels_dir()?.join(&release);
    let kernel = Kernel {
        series,
        package: package.clone(),
        version: version.clone(),
        release: release.clone(),
        vmlinuz: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio"),
    };
    let manifest = manifest_text(&kernel);
    if std::fs::read_to_string(dir.join(MANIFEST)).is_ok_and(|m| m == manifest)
        && kernel.vmlinuz.is_file()
        && kernel.initramfs.is_file()
    {
        println!("matrix: kernel {} cached ({package} {version}, {})", series.name, dir.display());
        return Ok(kernel);
    }
    let t0 = Instant::now();
    let parent = kernels_dir()?;
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("matrix: cannot create {}", parent.display()))?;
    let tmp = parent.join(format!(".{release}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)
        .with_context(|| format!("matrix: cannot create {}", tmp.display()))?;
    let built = unpack(&kernel, &tmp, &manifest);
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("matrix: cannot remove stale {}", dir.display()))?;
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another setup (a parallel worktree) may have put the same entry in place first.
        if std::fs::read_to_string(dir.join(MANIFEST)).is_ok_and(|m| m == manifest) {
            println!("matrix: kernel {} cached meanwhile by another run", series.name);
            return Ok(kernel);
        }
        return Err(e).with_context(|| {
            format!("matrix: cannot move {} to {}", tmp.display(), dir.display())
        });
    }
    println!(
        "matrix: kernel {} ready: {package} {version} in {} ({:.0}s)",
        series.name,
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(kernel)
}

/// `<cache>/kernels` (the cache root honours $ENFORCER_CACHE).
pub fn kernels_dir() -> Result<PathBuf> {
    Ok(crate::setup::cache_root()?.join("kernels"))
}

fn manifest_text(k: &Kernel) -> String {
    format!(
        "series={}\npackage={}\nversion={}\nrelease={}\ninitramfs={}\n",
        k.series.name,
        k.package,
        k.version,
        k.release,
        initramfs::FORMAT
    )
}

/// (version of linux-image-amd64, image package it depends on) for the newest
/// `linux-image-amd64` of `series` in the apt lists. Refreshes the lists once (CI) when the
/// series is missing.
fn resolve(series: Series) -> Result<(String, String)> {
    let version = match newest_version(series)? {
        Some(v) => v,
        None => {
            host::apt_update(&format!("no {} kernel in the apt lists", series.name))?;
            newest_version(series)?.with_context(|| {
                format!(
                    "matrix: no linux-image-amd64 {}.x in the apt lists (`apt-cache madison linux-image-amd64`); {} must be an apt source",
                    series.name, series.suite
                )
            })?
        }
    };
    let deps = output_step(
        "matrix: resolve the kernel image package",
        cmd("apt-cache").args(["depends", &format!("linux-image-amd64={version}")]),
    )?;
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .with_context(|| {
            format!(
                "matrix: linux-image-amd64={version} depends on no linux-image-*-amd64:\n{deps}"
            )
        })?
        .to_string();
    Ok((version, package))
}

/// The newest version of linux-image-amd64 in the `series` (madison lists newest first).
fn newest_version(series: Series) -> Result<Option<String>> {
    let out = output_step(
        "matrix: list kernel versions",
        cmd("apt-cache").args(["madison", "linux-image-amd64"]),
    )?;
    let prefix = format!("{}.", series.name);
    Ok(out
        .lines()
        .filter_map(|l| l.split('|').nth(1))
        .map(str::trim)
        .find(|v| v.starts_with(&prefix))
        .map(String::from))
}

/// Downloads and unpacks the image into `tmp`, keeps vmlinuz, builds the initramfs from the
/// package's own modules, drops the rest, writes the manifest last.
fn unpack(k: &Kernel, tmp: &Path, manifest: &str) -> Result<()> {
    run_step(
        &format!("matrix: download {}", k.package),
        cmd("apt-get")
            .current_dir(tmp)
            // As root, apt drops to `_apt`, which cannot write a cache under /root: say so.
            .args(if crate::is_root() { &["-o", "APT::Sandbox::User=root"][..] } else { &[] })
            .args(["download", "-q"])
            .arg(&k.package),
    )?;
    let deb = std::fs::read_dir(tmp)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("matrix: apt-get download left no .deb in {}", tmp.display()))?;
    let tree = tmp.join("pkg");
    run_step(
        &format!("matrix: unpack {}", k.package),
        cmd("dpkg-deb").arg("-x").arg(&deb).arg(&tree),
    )?;
    let vmlinuz = tree.join("boot").join(format!("vmlinuz-{}", k.release));
    if !vmlinuz.is_file() {
        bail!("matrix: {} has no boot/vmlinuz-{}", k.package, k.release);
    }
    std::fs::rename(&vmlinuz, tmp.join("vmlinuz"))
        .with_context(|| format!("matrix: cannot move {}", vmlinuz.display()))?;
    let modules = ["lib", "usr/lib"]
        .iter()
        .map(|d| tree.join(d).join("modules").join(&k.release))
        .find(|p| p.is_dir())
        .with_context(|| format!("matrix: {} has no modules/{}", k.package, k.release))?;
    initramfs::build(&modules, &tmp.join("initramfs.cpio"))?;
    std::fs::remove_dir_all(&tree)
        .with_context(|| format!("matrix: cannot remove {}", tree.display()))?;
    std::fs::remove_file(&deb)
        .with_context(|| format!("matrix: cannot remove {}", deb.display()))?;
    std::fs::write(tmp.join(MANIFEST), manifest)
        .with_context(|| format!("matrix: cannot write {}/{MANIFEST}", tmp.display()))?;
    Ok(())
}
