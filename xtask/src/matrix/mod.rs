//! The kernel matrix: the integration test binaries in [`GUEST_TESTS`], built on the host, run
//! inside Debian's bookworm 6.1 and bookworm-backports 6.12 kernels under QEMU with the host
//! root read-only (the same `enforcer` binary the host suite tested), one test at a time.
//! Failure of any guest test, or a guest that hangs, fails the step naming the kernel.

pub(crate) mod host;
mod initramfs;
pub mod kernels;
pub(crate) mod qemu;

use crate::{build::Built, cmd, root, show};
use anyhow::{Context, Result, bail};
use kernels::{Kernel, SERIES, Series};
use qemu::GuestTest;
use std::time::Instant;

/// The `[[test]]` targets of enforcer-tests that run inside every guest kernel.
pub const GUEST_TESTS: &[&str] = &["matrix", "lsm", "egress_kernels"];

/// The harness's wait factor in guests (tests/support: daemon ready, events).
const GUEST_TIME_SCALE: u32 = 4;

/// `--kernel`: which guest kernels `cargo xtask test` boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    /// Debian bookworm's current 6.1 kernel only (and nothing else: no lint, host suite, fuzz).
    #[value(name = "6.1")]
    V6_1,
    /// bookworm-backports' current 6.12 kernel only (and nothing else).
    #[value(name = "6.12")]
    V6_12,
    /// The full host suite, then every guest kernel.
    All,
    /// The full host suite, no guest.
    None,
}

impl KernelChoice {
    /// The series this choice boots.
    pub fn series(self) -> Vec<Series> {
        let named = |n: &str| SERIES.iter().copied().filter(|s| s.name == n).collect();
        match self {
            KernelChoice::V6_1 => named("6.1"),
            KernelChoice::V6_12 => named("6.12"),
            KernelChoice::All => SERIES.to_vec(),
            KernelChoice::None => Vec::new(),
        }
    }
}

/// `cargo xtask setup`: host tools and every series' kernel and initramfs, cached. Outside CI
/// a missing piece is reported, not fatal (like the other system packages of setup): the
/// matrix step of `cargo xtask test` then fails naming it.
pub fn setup() -> Result<Vec<Kernel>> {
    let all = || -> Result<Vec<Kernel>> {
        host::ensure()?;
        SERIES.iter().map(|s| kernels::ensure(*s)).collect()
    };
    match all() {
        Err(e) if !host::may_install() => {
            println!("setup: kernel matrix not ready: {e:#}");
            Ok(Vec::new())
        }
        r => r,
    }
}

/// Runs the guest suite on each of `series`; `args` go to the test harness.
pub fn run(series: &[Series], args: &[String], built: &Built) -> Result<()> {
    if series.is_empty() {
        return Ok(());
    }
    host::ensure()?;
    let qemu = host::qemu().context("matrix: qemu-system-x86_64 not found")?;
    let kernels: Vec<Kernel> = series.iter().map(|s| kernels::ensure(*s)).collect::<Result<_>>()?;
    let mut tests = guest_binaries(built)?;
    for t in &mut tests {
        t.args = ["--test-threads=1", "--show-output"].iter().map(|a| a.to_string()).collect();
        t.args.extend(args.iter().cloned());
    }
    let env = vec![
        ("ENFORCER_BIN".to_string(), built.enforcer.display().to_string()),
        // Emulation (TCG) is several times slower than the host: the harness waits longer.
        ("ENFORCER_TEST_TIME_SCALE".to_string(), GUEST_TIME_SCALE.to_string()),
    ];
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for k in &kernels {
        let out_dir = root().join("target").join("matrix").join(&k.release);
        let mut env = env.clone();
        env.push(("ENFORCER_MATRIX_KERNEL".into(), k.series.name.into()));
        println!(
            "matrix: kernel {} = {} {} ({}): running {} in the guest",
            k.series.name,
            k.package,
            k.version,
            k.series.suite,
            tests.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
        );
        let g = qemu::run(&qemu, k, &tests, &env, &out_dir)?;
        let (mut passed, mut fails) = (0, 0);
        let mut problems = Vec::new();
        for r in &g.runs {
            let (p, f) = counts(&r.log);
            passed += p;
            fails += f;
            println!("matrix: {} on {}: output\n{}", r.name, k.release, r.log.trim_end());
            match r.code {
                Some(0) => {}
                Some(qemu::TIMED_OUT) => problems.push(format!(
                    "{} killed by the guest's timeout after {}s",
                    r.name,
                    qemu::BINARY_LIMIT_S
                )),
                Some(c) => problems.push(format!("{} exited {c}", r.name)),
                None => problems.push(format!("{} did not finish", r.name)),
            }
        }
        if g.hung {
            problems.push(format!("guest hung: killed after {:.0}s", g.total_s));
        }
        if g.uname.as_deref() != Some(k.release.as_str()) {
            problems.push(format!("guest ran uname -r {:?}, expected {:?}", g.uname, k.release));
        }
        let secs: Vec<String> = g
            .runs
            .iter()
            .map(|r| format!("{} {}", r.name, r.secs.map_or("-".into(), |s| format!("{s:.1}s"))))
            .collect();
        let line = format!(
            "kernel {} ({} {}): {passed} passed, {fails} failed; boot {}, tests {}, total {:.1}s{}",
            k.release,
            k.package,
            k.version,
            g.boot_s.map_or("-".into(), |s| format!("{s:.1}s")),
            secs.join(", "),
            g.total_s,
            if problems.is_empty() {
                String::new()
            } else {
                format!(" — FAILED: {}", problems.join("; "))
            }
        );
        if !problems.is_empty() {
            println!("matrix: console tail ({}):\n{}", g.console.display(), g.console_tail(40));
            failed.push(format!("{} ({})", k.release, problems.join("; ")));
        }
        println!("matrix: {line}");
        summary.push(line);
    }
    println!("matrix summary:\n  {}", summary.join("\n  "));
    if !failed.is_empty() {
        bail!("matrix: guest tests failed on kernel {}", failed.join(", "));
    }
    Ok(())
}

/// (passed, failed) summed over the harness's "test result:" lines.
fn counts(log: &str) -> (u64, u64) {
    let mut sum = (0, 0);
    for l in log.lines().filter(|l| l.starts_with("test result:")) {
        let num = |what: &str| {
            l.split(';')
                .find_map(|part| {
                    part.trim()
                        .strip_suffix(what)
                        .map(|n| n.trim().rsplit(' ').next().unwrap_or("").to_string())
                })
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        sum.0 += num("passed");
        sum.1 += num("failed");
    }
    sum
}

/// Builds the guest test binaries (release, the same profile and features as the host suite,
/// so nothing is rebuilt after it) and returns their executables.
fn guest_binaries(built: &Built) -> Result<Vec<GuestTest>> {
    let mut c = cmd("cargo");
    c.current_dir(root()).env("ENFORCER_BPF_OBJ", &built.bpf_obj).args([
        "test",
        "--release",
        "--workspace",
        "--no-run",
        "--message-format=json",
    ]);
    for t in GUEST_TESTS {
        c.args(["--test", t]);
    }
    println!("$ {}", show(&c));
    let t0 = Instant::now();
    let out =
        c.stderr(std::process::Stdio::inherit()).output().context("matrix: cannot run cargo")?;
    if !out.status.success() {
        bail!("matrix: building the guest tests failed: `{}`", show(&c));
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] != "compiler-artifact"
            || !msg["profile"]["test"].as_bool().unwrap_or(false)
        {
            continue;
        }
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        let is_test =
            msg["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, true, Some(exe)) =
            (is_test, GUEST_TESTS.contains(&name), msg["executable"].as_str())
        {
            found.push(GuestTest {
                name: name.to_string(),
                exe: exe.into(),
                args: Vec::new(),
                limit_s: qemu::BINARY_LIMIT_S,
            });
        }
    }
    for t in GUEST_TESTS {
        if !found.iter().any(|f| f.name == *t) {
            bail!(
                "matrix: cargo built no test executable named {t} (a [[test]] of enforcer-tests?)"
            );
        }
    }
    println!("matrix: guest test binaries ready ({:.1}s)", t0.elapsed().as_secs_f64());
    Ok(found)
}

#[cfg(test)]
mod tests {
    #[test]
    fn harness_counts_are_summed() {
        let log = "running 3 tests\ntest a ... ok\n\ntest result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 44.10s\ntest result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s\n";
        assert_eq!(super::counts(log), (4, 2));
        assert_eq!(super::counts("killed"), (0, 0));
    }
}
