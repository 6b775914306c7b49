//! `cargo xtask fuzz [--minutes N] [TARGET]`, and the bounded fuzz runs of `cargo xtask test`.
//!
//! The libFuzzer binaries are built with plain `cargo +nightly build` and the flags cargo-fuzz
//! passes (sanitizer coverage, `--cfg fuzzing`, debug assertions, AddressSanitizer), so a fresh
//! machine needs no extra tool. `--target <host>` keeps the flags off build scripts and proc
//! macros, exactly as cargo-fuzz does. Targets are the files in fuzz/fuzz_targets/. No
//! `--locked`: fuzz/Cargo.lock pins what it has, and a dependency added to enforcer is resolved
//! instead of failing the build.
//!
//! Runs never write into the repository: `fuzz` grows a corpus in fuzz/target/corpus/<target>
//! (seeded from the committed fuzz/corpus/<target>), `test` works on a temporary copy of the
//! seeds. Crashing inputs go to fuzz/artifacts/<target>/ (git-ignored), libFuzzer's output to
//! fuzz/target/fuzz-logs/<target>.log.

use crate::{cmd, output_step, root, run_step, show};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

/// cargo-fuzz's default instrumentation (coverage level 4, 8-bit counters, PC table, CMP tracing,
/// stack depth), plus what `cargo fuzz build` adds by default.
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cllvm-args=-sanitizer-coverage-stack-depth",
    "--cfg",
    "fuzzing",
    "-Cdebug-assertions",
    "-Coverflow-checks",
    "-Zsanitizer=address",
];

/// libFuzzer options for every run: a hang (10 s on one input) or 2 GiB RSS is a failure.
const LIBFUZZER_OPTS: &[&str] = &["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"];

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

/// Target names: the stems of fuzz/fuzz_targets/*.rs, sorted.
pub fn targets() -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("fuzz: cannot read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    v.sort();
    if v.is_empty() {
        bail!("fuzz: no targets in {}", dir.display());
    }
    Ok(v)
}

/// Builds every fuzz target; returns the directory holding the binaries.
pub fn build() -> Result<PathBuf> {
    let vv = output_step("fuzz: query nightly rustc", cmd("rustc").args(["+nightly", "-vV"]))?;
    let host = vv
        .lines()
        .find_map(|l| l.strip_prefix("host:"))
        .map(|h| h.trim().to_string())
        .context("fuzz: `rustc +nightly -vV` printed no \"host:\" line")?;
    let t0 = Instant::now();
    let mut c = cmd("cargo");
    c.current_dir(fuzz_dir()).env("RUSTFLAGS", RUSTFLAGS.join(" ")).args([
        "+nightly",
        "build",
        "--release",
        "--bins",
        "--locked",
        "--target",
        &host,
    ]);
    run_step("fuzz: build targets (nightly, libFuzzer + ASan)", &mut c)?;
    let bin_dir = fuzz_dir().join("target").join(&host).join("release");
    println!("fuzz: built targets in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(bin_dir)
}

/// What one run reported.
struct Stats {
    execs: u64,
    new_units: u64,
    corpus: usize,
    peak_rss_mb: u64,
    secs: f64,
}

/// Runs `target` for `seconds` on `corpus` (which it grows); error if it crashes, hangs or
/// exceeds the memory limit, with the tail of libFuzzer's output.
fn run_one(bin_dir: &Path, target: &str, corpus: &Path, seconds: u64) -> Result<Stats> {
    let bin = bin_dir.join(target);
    if !bin.is_file() {
        bail!("fuzz: {} is missing (build the targets first)", bin.display());
    }
    let artifacts = fuzz_dir().join("artifacts").join(target);
    let logs = fuzz_dir().join("target").join("fuzz-logs");
    for d in [&artifacts, &logs] {
        std::fs::create_dir_all(d)
            .with_context(|| format!("fuzz: cannot create {}", d.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("fuzz: cannot create {}", log_path.display()))?;
    let mut c = cmd(bin.to_str().context("fuzz: non-UTF-8 binary path")?);
    c.current_dir(fuzz_dir())
        // cargo-fuzz's default: libFuzzer's own globals trip the ODR check.
        .env("ASAN_OPTIONS", "detect_odr_violation=0")
        .arg(corpus)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(LIBFUZZER_OPTS)
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null());
    println!("$ {} > {}", show(&c), log_path.display());
    let t0 = Instant::now();
    let status = c.status().with_context(|| format!("fuzz: cannot start {}", bin.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        bail!(
            "fuzz: target {target} FAILED ({status}) after {secs:.0}s; crashing input in {}; \
             full log {}\n{tail}",
            artifacts.display(),
            log_path.display()
        );
    }
    let stat = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let corpus_len = std::fs::read_dir(corpus).map(|d| d.count()).unwrap_or(0);
    Ok(Stats {
        execs: stat("number_of_executed_units"),
        new_units: stat("new_units_added"),
        corpus: corpus_len,
        peak_rss_mb: stat("peak_rss_mb"),
        secs,
    })
}

fn summary(target: &str, s: &Stats) -> String {
    format!(
        "fuzz: {target:<14} ok: {} execs in {:.0}s ({:.0}/s), {} new inputs, corpus {}, peak RSS {} MB",
        s.execs,
        s.secs,
        s.execs as f64 / s.secs.max(0.001),
        s.new_units,
        s.corpus,
        s.peak_rss_mb
    )
}

/// Copies the files of `from` (if it exists) into `to` that `to` does not have yet.
fn copy_seeds(from: &Path, to: &Path) -> Result<usize> {
    std::fs::create_dir_all(to).with_context(|| format!("fuzz: cannot create {}", to.display()))?;
    let Ok(entries) = std::fs::read_dir(from) else { return Ok(0) };
    let mut n = 0;
    for e in entries {
        let e = e?;
        if !e.file_type()?.is_file() {
            continue;
        }
        let dst = to.join(e.file_name());
        if !dst.exists() {
            std::fs::copy(e.path(), &dst).with_context(|| {
                format!("fuzz: cannot copy {} to {}", e.path().display(), dst.display())
            })?;
            n += 1;
        }
    }
    Ok(n)
}

fn selected(target: Option<&str>) -> Result<Vec<String>> {
    let all = targets()?;
    match target {
        None => Ok(all),
        Some(t) if all.iter().any(|a| a == t) => Ok(vec![t.to_string()]),
        Some(t) => bail!("fuzz: unknown target {t:?}; targets: {}", all.join(", ")),
    }
}

/// `cargo xtask fuzz`: each selected target for `minutes`, on a persistent corpus.
pub fn run(minutes: u64, target: Option<&str>) -> Result<()> {
    let targets = selected(target)?;
    let bin_dir = build()?;
    let mut failed = Vec::new();
    for t in &targets {
        let corpus = fuzz_dir().join("target").join("corpus").join(t);
        copy_seeds(&fuzz_dir().join("corpus").join(t), &corpus)?;
        match run_one(&bin_dir, t, &corpus, minutes * 60) {
            Ok(s) => println!("{}", summary(t, &s)),
            Err(e) => {
                eprintln!("{e:#}");
                failed.push(t.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("fuzz: {} target(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

/// `cargo xtask test`: build, then every target for `seconds` on a temporary copy of its seeds.
/// Runs all targets, then fails if any failed.
pub fn smoke(seconds: u64) -> Result<()> {
    let bin_dir = build()?;
    let tmp = std::env::temp_dir().join(format!("enforcer-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        let mut failed = Vec::new();
        for t in targets()? {
            let corpus = tmp.join(&t);
            copy_seeds(&fuzz_dir().join("corpus").join(&t), &corpus)?;
            match run_one(&bin_dir, &t, &corpus, seconds) {
                Ok(s) => println!("{}", summary(&t, &s)),
                Err(e) => {
                    eprintln!("{e:#}");
                    failed.push(t);
                }
            }
        }
        if !failed.is_empty() {
            bail!("fuzz: {} target(s) failed: {}", failed.len(), failed.join(", "));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}
