//! tracefs: mounted on demand (aya's tracepoint attach fails with "tracefs not found"
//! otherwise) and read for tracepoint field offsets, which differ between kernels.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Returns the tracefs mount, mounting it at /sys/kernel/tracing when absent.
pub fn ensure_mounted() -> Result<PathBuf> {
    for c in CANDIDATES {
        if Path::new(c).join("events").is_dir() {
            return Ok(PathBuf::from(c));
        }
    }
    let target = CANDIDATES[0];
    nix::mount::mount(
        Some("tracefs"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount tracefs at {target}"))?;
    Ok(PathBuf::from(target))
}

/// Offset of `field` in the record of tracepoint `category/name`, from its `format` file.
pub fn field_offset(
    tracefs: &Path,
    category: &str,
    name: &str,
    field: &str,
) -> Result<Option<u32>> {
    let path = tracefs.join("events").join(category).join(name).join("format");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    Ok(parse_offset(&text, field))
}

fn parse_offset(format: &str, field: &str) -> Option<u32> {
    for line in format.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else { continue };
        let mut parts = rest.split(';');
        let decl = parts.next()?.trim();
        // The declared name is the last word, without any array suffix: "char comm[16]".
        let name = decl.rsplit(' ').next()?.split('[').next()?;
        if name != field {
            continue;
        }
        for p in parts {
            if let Some(v) = p.trim().strip_prefix("offset:") {
                return v.trim().parse().ok();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::parse_offset;

    const EXEC: &str = "name: sched_process_exec\nID: 310\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:pid_t old_pid;\toffset:16;\tsize:4;\tsigned:1;\n\tfield:char comm[16];\toffset:20;\tsize:16;\tsigned:0;\n";

    #[test]
    fn finds_offsets() {
        assert_eq!(parse_offset(EXEC, "filename"), Some(8));
        assert_eq!(parse_offset(EXEC, "pid"), Some(12));
        assert_eq!(parse_offset(EXEC, "old_pid"), Some(16));
        assert_eq!(parse_offset(EXEC, "comm"), Some(20));
        assert_eq!(parse_offset(EXEC, "group_dead"), None);
    }
}
