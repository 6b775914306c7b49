//! What the host needs to boot guests: qemu-system-x86 from bookworm-backports (bookworm's own
//! 7.2 conflicts with the backports qemu-utils these machines carry), busybox-static (the
//! initramfs), xz (the kernels' modules are .ko.xz), and bookworm-backports as an apt source (the
//! 6.12 kernel comes from there). Like the other system packages of `setup`, apt changes are
//! made only in CI (CI set, as root); elsewhere the missing pieces are named with the command.

use crate::{cmd, is_root, on_path, output_step, run_step};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

const BACKPORTS: &str = "bookworm-backports";
const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/enforcer-bookworm-backports.sources";

/// Whether this run may change the system's packages.
pub fn may_install() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty()) && is_root()
}

/// The qemu binary the matrix runs.
pub fn qemu() -> Option<PathBuf> {
    on_path("qemu-system-x86_64")
}

/// The static busybox the initramfs carries (busybox-static installs it as /bin/busybox).
pub fn busybox() -> Result<PathBuf> {
    let p = on_path("busybox").unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    if !is_static(&p) {
        bail!(
            "matrix: {} is missing or not statically linked (install busybox-static)",
            p.display()
        );
    }
    Ok(p)
}

/// An ELF without a PT_INTERP program header runs without a dynamic loader (in the initramfs).
fn is_static(p: &Path) -> bool {
    let Ok(elf) = std::fs::read(p) else { return false };
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let off = phoff + i * phentsize;
        // PT_INTERP = 3.
        off + 4 <= elf.len() && u32::from_le_bytes(elf[off..off + 4].try_into().unwrap()) != 3
    })
}

/// Installs what is missing (CI) or fails naming it and the command.
pub fn ensure() -> Result<()> {
    let source = backports_source()?;
    let mut missing: Vec<&str> = Vec::new();
    if qemu().is_none() {
        missing.push("qemu-system-x86/bookworm-backports");
    }
    if busybox().is_err() {
        missing.push("busybox-static");
    }
    if on_path("xz").is_none() {
        missing.push("xz-utils");
    }
    if source.is_some() && missing.is_empty() {
        println!(
            "matrix: host tools present ({}, busybox-static, xz; {BACKPORTS} is an apt source)",
            qemu().unwrap_or_default().display()
        );
        return Ok(());
    }
    if !may_install() {
        let mut steps = Vec::new();
        if source.is_none() {
            steps.push(format!(
                "add the apt source `{BACKPORTS}` of your Debian archive (as {BACKPORTS_SOURCE})"
            ));
        }
        if !missing.is_empty() {
            steps.push(format!(
                "apt-get update && apt-get install -y --no-install-recommends {}",
                missing.join(" ")
            ));
        }
        bail!(
            "matrix: the QEMU kernel matrix needs: {} (or run `CI=true cargo xtask setup` as root; `--kernel none` skips the matrix)",
            steps.join("; then ")
        );
    }
    if source.is_none() {
        add_backports_source()?;
        APT_UPDATED.store(false, Ordering::SeqCst);
    }
    apt_update("new packages")?;
    if !missing.is_empty() {
        run_step(
            "matrix: install host tools",
            cmd("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )?;
    }
    let qemu = qemu().context("matrix: qemu-system-x86_64 still missing after install")?;
    busybox()?;
    let v = output_step("matrix: qemu version", cmd(qemu.to_str().unwrap()).arg("--version"))?;
    println!("matrix: installed {} ({})", missing.join(" "), v.lines().next().unwrap_or(""));
    Ok(())
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Whether this run already refreshed the apt lists.
pub fn apt_updated() -> bool {
    APT_UPDATED.load(Ordering::SeqCst)
}

/// `apt-get update`, at most once per run, and only where this run may change packages.
pub fn apt_update(why: &str) -> Result<()> {
    if APT_UPDATED.load(Ordering::SeqCst) {
        return Ok(());
    }
    if !may_install() {
        bail!("matrix: {why}: run `apt-get update` as root (or `CI=true cargo xtask setup`)");
    }
    run_step("matrix: apt-get update", cmd("apt-get").args(["update", "-q"]))?;
    APT_UPDATED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Every apt source file: sources.list and sources.list.d/*.{list,sources}.
fn source_files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files
}

/// The file that declares bookworm-backports, if any (comments ignored).
fn backports_source() -> Result<Option<PathBuf>> {
    for f in source_files() {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        if declares_backports(&text) {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

/// Adds bookworm-backports from the same archive (URI and keyring) that serves bookworm.
fn add_backports_source() -> Result<()> {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    if !os.lines().any(|l| l.trim() == "VERSION_CODENAME=bookworm") {
        bail!(
            "matrix: this host is not Debian bookworm (/etc/os-release); add {BACKPORTS} by hand"
        );
    }
    let (uri, signed_by) = bookworm_archive()?.context(
        "matrix: no apt source serves the suite `bookworm`: cannot derive the bookworm-backports URI",
    )?;
    let mut text = format!(
        "# Added by `cargo xtask setup` (enforcer): the 6.12 kernel and qemu 10 for the kernel matrix.\nTypes: deb\nURIs: {uri}\nSuites: {BACKPORTS}\nComponents: main\n"
    );
    if let Some(k) = signed_by {
        text += &format!("Signed-By: {k}\n");
    }
    std::fs::write(BACKPORTS_SOURCE, &text)
        .with_context(|| format!("matrix: cannot write {BACKPORTS_SOURCE}"))?;
    println!("matrix: added {BACKPORTS_SOURCE}:\n{text}");
    Ok(())
}

/// (URI, Signed-By) of the first source serving suite `bookworm` (deb822 or one-line form).
fn bookworm_archive() -> Result<Option<(String, Option<String>)>> {
    for f in source_files() {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        let deb822 = f.extension().is_some_and(|x| x == "sources");
        if let Some(found) = archive_in(deb822, &text) {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The (URI, Signed-By) serving `deb` packages of suite `bookworm` in one source file's text.
fn archive_in(deb822: bool, text: &str) -> Option<(String, Option<String>)> {
    if deb822 {
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().filter(|l| !l.trim_start().starts_with('#')).find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
                })
            };
            let has = |name: &str, word: &str| {
                field(name).is_some_and(|s| s.split_whitespace().any(|w| w == word))
            };
            let uri = field("URIs").and_then(|u| u.split_whitespace().next().map(String::from));
            if let (true, true, Some(uri)) = (has("Suites", "bookworm"), has("Types", "deb"), uri) {
                return Some((uri, field("Signed-By")));
            }
        }
        return None;
    }
    for l in text.lines().map(|l| l.split('#').next().unwrap_or("").trim()) {
        // `deb [opt=v ...] URI suite components`
        let Some(rest) = l.strip_prefix("deb ") else { continue };
        let rest = match rest.trim_start().strip_prefix('[') {
            Some(opts) => opts.split_once(']').map_or("", |(_, r)| r),
            None => rest,
        };
        let w: Vec<&str> = rest.split_whitespace().collect();
        if w.len() >= 2 && w[1] == "bookworm" {
            return Some((w[0].to_string(), None));
        }
    }
    None
}

/// Whether a source file's text declares bookworm-backports (comments ignored).
fn declares_backports(text: &str) -> bool {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .any(|l| l.split_whitespace().any(|w| w == BACKPORTS))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_SOURCES: &str = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n";

    #[test]
    fn the_bookworm_archive_is_found_in_deb822_and_one_line_sources() {
        assert_eq!(
            archive_in(true, DEBIAN_SOURCES),
            Some((
                "http://deb.debian.org/debian".into(),
                Some("/usr/share/keyrings/debian-archive-keyring.gpg".into())
            ))
        );
        assert_eq!(
            archive_in(
                true,
                "Types: deb\nURIs: http://x/debian-security\nSuites: bookworm-security\n"
            ),
            None
        );
        assert_eq!(
            archive_in(
                false,
                "# deb http://old bookworm main\ndeb-src http://src bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror/debian bookworm main\n"
            ),
            Some(("http://mirror/debian".into(), None))
        );
        assert_eq!(archive_in(false, "deb http://m/debian bookworm-updates main\n"), None);
    }

    #[test]
    fn backports_is_declared_only_outside_comments() {
        assert!(!declares_backports(DEBIAN_SOURCES));
        assert!(!declares_backports("# Suites: bookworm-backports\n"));
        assert!(declares_backports(
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n"
        ));
        assert!(declares_backports("deb http://deb.debian.org/debian bookworm-backports main\n"));
    }
}
