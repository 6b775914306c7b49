//! The guest's initramfs: a static busybox, the modules that mount the host root over
//! virtio-9p (virtio_pci, 9pnet_virtio, 9p and what they depend on, decompressed from the
//! kernel's own module tree), and an /init that mounts the host root read-only, a tmpfs on
//! /run, the results share on /run/enforcer-matrix, and switch_roots into the script the host
//! left there (`qemu::GUEST_SCRIPT`). Written as an uncompressed newc cpio archive.

use super::host;
use crate::cmd;
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Changes whenever the archive's layout or /init changes: invalidates cached initramfs.
pub const FORMAT: &str = "1";

/// Modules the 9p root needs, in the order they are wanted (their dependencies come first).
const WANTED: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// Where the results share is mounted in the guest; the host writes the guest script there.
pub const RESULTS_MOUNT: &str = "/run/enforcer-matrix";

/// 9p mounts: protocol 9p2000.L, large messages (the binaries are tens of MB).
const P9_OPTS: &str = "trans=virtio,version=9p2000.L,msize=262144";

fn init_script(modules: &[String], guest_script: &str) -> String {
    let insmods: String = modules
        .iter()
        .map(|m| format!("insmod /lib/modules/{m} || fail \"insmod {m}\"\n"))
        .collect();
    format!(
        r#"#!/bin/busybox sh
# enforcer kernel matrix, stage 1: mount the host root (read-only) and the results share.
/bin/busybox --install -s /bin
export PATH=/bin
fail() {{ echo "enforcer-matrix: initramfs: $1 failed"; poweroff -f; sleep 5; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{insmods}mount -t 9p -o {P9_OPTS},ro,cache=loose hostroot /newroot || fail "mount hostroot"
mount -t tmpfs -o mode=0755 run /newroot/run || fail "mount /run"
mkdir -p /newroot{RESULTS_MOUNT}
mount -t 9p -o {P9_OPTS} results /newroot{RESULTS_MOUNT} || fail "mount results"
[ -x /newroot{RESULTS_MOUNT}/{guest_script} ] || fail "find the guest script"
umount /proc /sys /dev
exec switch_root /newroot {RESULTS_MOUNT}/{guest_script}
"#
    )
}

/// Builds the archive for the kernel whose module tree is `modules` into `out`.
pub fn build(modules: &Path, out: &Path) -> Result<()> {
    let busybox = host::busybox()?;
    let index = module_index(modules)?;
    let builtin = builtin_names(modules);
    let mut order: Vec<String> = Vec::new();
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for m in WANTED {
        if builtin.contains(*m) {
            continue;
        }
        add_with_deps(m, &index, &builtin, &mut seen, &mut order, &mut blobs, 0)?;
    }
    let files: Vec<String> =
        order.iter().enumerate().map(|(i, m)| format!("{i:02}-{m}.ko")).collect();
    let mut a = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        a.dir(d);
    }
    a.char_dev("dev/console", 5, 1);
    let bb = std::fs::read(&busybox)
        .with_context(|| format!("matrix: cannot read {}", busybox.display()))?;
    a.file("bin/busybox", 0o755, &bb);
    for (m, f) in order.iter().zip(&files) {
        a.file(&format!("lib/modules/{f}"), 0o644, &blobs[m]);
    }
    a.file("init", 0o755, init_script(&files, super::qemu::GUEST_SCRIPT).as_bytes());
    std::fs::write(out, a.finish())
        .with_context(|| format!("matrix: cannot write {}", out.display()))?;
    println!(
        "matrix: initramfs {} (busybox + modules {})",
        out.display(),
        if order.is_empty() { "none: 9p is built in".to_string() } else { order.join(", ") }
    );
    Ok(())
}

/// Module name (dashes as underscores) -> file, for every .ko[.xz|.zst] under `modules`.
fn module_index(modules: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut dirs = vec![modules.to_path_buf()];
    // Bounded walk: a kernel tree has a few hundred directories.
    let mut visited = 0;
    while let Some(d) = dirs.pop() {
        visited += 1;
        if visited > 100_000 {
            bail!("matrix: {} has too many directories", modules.display());
        }
        for e in std::fs::read_dir(&d).with_context(|| format!("matrix: read {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| [".ko", ".ko.xz", ".ko.zst"].iter().find_map(|x| n.strip_suffix(x)))
            {
                index.insert(stem.replace('-', "_"), p.clone());
            }
        }
    }
    Ok(index)
}

/// Names listed in modules.builtin (compiled into the image, nothing to load).
fn builtin_names(modules: &Path) -> HashSet<String> {
    std::fs::read_to_string(modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(|f| f.trim_end_matches(".ko").replace('-', "_"))
        .collect()
}

/// Post-order: every dependency (from the module's own `depends=`) before the module.
fn add_with_deps(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
    blobs: &mut BTreeMap<String, Vec<u8>>,
    depth: usize,
) -> Result<()> {
    let name = name.replace('-', "_");
    if depth > 32 {
        bail!("matrix: module dependencies deeper than 32 at {name}");
    }
    if builtin.contains(&name) || !seen.insert(name.clone()) {
        return Ok(());
    }
    let path = index
        .get(&name)
        .with_context(|| format!("matrix: module {name} is neither built in nor in the package"))?;
    let blob = decompress(path)?;
    for dep in modinfo(&blob, "depends").split(',').filter(|d| !d.is_empty()) {
        add_with_deps(dep, index, builtin, seen, order, blobs, depth + 1)?;
    }
    order.push(name.clone());
    blobs.insert(name, blob);
    Ok(())
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return std::fs::read(path).with_context(|| format!("matrix: read {name}"));
    };
    let mut c = cmd(tool);
    c.args(["-dc", "--"]).arg(path);
    let out = c.output().with_context(|| format!("matrix: cannot run {tool} on {name}"))?;
    if !out.status.success() {
        bail!("matrix: {tool} -dc {name} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// A `key=value` string of the module's .modinfo section (NUL-separated strings).
fn modinfo(blob: &[u8], key: &str) -> String {
    let needle = format!("{key}=");
    blob.split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(needle.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// A newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }
    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }
    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_reads_the_depends_string() {
        let blob = b"\x7fELF...\0license=GPL\0depends=9pnet,netfs\0name=9p\0";
        assert_eq!(modinfo(blob, "depends"), "9pnet,netfs");
        assert_eq!(modinfo(b"\0depends=\0", "depends"), "");
        assert_eq!(modinfo(b"nothing", "depends"), "");
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut a = Cpio::default();
        a.dir("bin");
        a.char_dev("dev/console", 5, 1);
        a.file("init", 0o755, b"#!/bin/sh\n");
        let out = a.finish();
        assert_eq!(&out[..6], b"070701");
        assert_eq!(out.len() % 4, 0);
        // Second entry starts aligned: header (110) + "bin\0" padded to 116.
        assert_eq!(&out[116..122], b"070701");
        assert_eq!(&out[116 + 6 + 8..116 + 6 + 16], b"00002180", "mode of a char device");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
