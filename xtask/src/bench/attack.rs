//! Issue 13 rows (the daemon under attack): fork+exec of /bin/true while an exec storm with
//! changing environments runs in the bench cgroup, with and without the daemon (interleaved),
//! and the daemon's own CPU per exec record; the daemon's RSS idle and during and after a
//! soak (exec storm whose processes open the secret, API flood on fresh connections),
//! broken down from /proc/PID/smaps, with the daemon's table sizes (`status` `memory`) and its
//! start-up peak (VmHWM). Decision latency under the 2 TiB attacker (case 1) is measured in
//! the enforce rounds (`rounds.rs`). About 2 minutes. `ENFORCER_BENCH_SOAK_SECS` sets the
//! soak's length (default 60 s), `ENFORCER_BENCH_ATTACK=soak` skips the exec-storm rows.

use super::grants;
use super::harness::Bench;
use super::report::{Row, median};
use super::{Kind, check_interrupted};
use anyhow::{Context, Result, anyhow, bail};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Interleaved storm rounds (each: with the daemon, without it).
const STORM_ROUNDS: usize = 7;
/// fork+exec of /bin/true per probe.
const PROBE_EXECS: u64 = 600;
const RATIO_MAX: f64 = 1.05;
/// Soak length (`ENFORCER_BENCH_SOAK_SECS` overrides it) and RSS sampling interval.
const SOAK: Duration = Duration::from_secs(60);
const SAMPLE_EVERY: Duration = Duration::from_secs(4);
/// Idle RSS target and the growth allowed after the soak's warm-up (its first third, 20 s).
const IDLE_RSS_MAX_KB: u64 = 32 * 1024;
const GROWTH_MAX_KB: u64 = 2 * 1024;

pub(super) fn rows(b: &mut Bench) -> Vec<Row> {
    let mut rows = Vec::new();
    match b.rss_soak() {
        Ok(r) => rows.extend(r),
        Err(e) => rows.push(error_row("daemon RSS idle and after the soak", &e)),
    }
    let _ = b.stop_daemon();
    // ENFORCER_BENCH_ATTACK=soak: the soak alone (investigating memory).
    if std::env::var("ENFORCER_BENCH_ATTACK").is_ok_and(|v| v == "soak") {
        return rows;
    }
    match b.exec_storm() {
        Ok(r) => rows.extend(r),
        Err(e) => rows.push(error_row("fork+exec under an exec storm", &e)),
    }
    let _ = b.stop_daemon();
    rows
}

fn error_row(name: &str, e: &anyhow::Error) -> Row {
    Row {
        name: name.into(),
        without: "-".into(),
        with: format!("error: {e:#}"),
        ratio: "-".into(),
        target: "no error".into(),
        pass: Some(false),
    }
}

/// Memory of one process: VmRSS and what it is made of.
#[derive(Clone, Copy, Debug, Default)]
struct Rss {
    total: u64,
    anon: u64,
    /// The ring buffers' user mappings (`anon_inode:bpf-map`; data pages mapped twice).
    rings: u64,
    /// The daemon's own binary (text, rodata, data), shared clean page cache.
    binary: u64,
    /// Other files (libc, libm, ...).
    libs: u64,
    shmem: u64,
    /// Anonymous memory by kind: the main arena (`[heap]`), glibc's other arenas (64 MiB
    /// aligned mappings) and the rest (thread stacks, blocks mmap'd whole).
    heap: u64,
    arenas: u64,
    other_anon: u64,
    /// Peak RSS since start (VmHWM).
    hwm: u64,
}

impl Rss {
    fn read(pid: u32) -> Result<Rss> {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
            .with_context(|| format!("bench: cannot read /proc/{pid}/smaps"))?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?.to_string_lossy().into_owned();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k)?.split_whitespace().next()?.parse::<u64>().ok())
                .ok_or_else(|| anyhow!("bench: no {k} in /proc/{pid}/status"))
        };
        let mut r = Rss {
            total: field("VmRSS:")?,
            anon: field("RssAnon:")?,
            shmem: field("RssShmem:")?,
            hwm: field("VmHWM:")?,
            ..Rss::default()
        };
        let mut name = String::new();
        let mut start = 0u64;
        for l in smaps.lines() {
            let first = l.split_whitespace().next().unwrap_or("");
            if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                name = l.split_whitespace().nth(5).unwrap_or("").to_string();
                start =
                    u64::from_str_radix(first.split('-').next().unwrap_or("0"), 16).unwrap_or(0);
            } else if let Some(v) = l.strip_prefix("Rss:") {
                let kb: u64 = v.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
                if name == "[heap]" {
                    r.heap += kb;
                } else if name.is_empty() && start.is_multiple_of(64 << 20) {
                    r.arenas += kb;
                } else if name.is_empty() {
                    r.other_anon += kb;
                }
                if name.starts_with("anon_inode:bpf-map") {
                    r.rings += kb;
                } else if name == exe.trim_end_matches(" (deleted)") {
                    r.binary += kb;
                } else if name.starts_with('/') {
                    r.libs += kb;
                }
            }
        }
        Ok(r)
    }

    fn show(&self) -> String {
        format!(
            "{:.1} MB (anon {:.1}: heap {:.1}, arenas {:.1}, other {:.1}; ring mappings {:.1}, binary {:.1}, libs {:.1}, shmem {:.1}; without the rings {:.1}; VmHWM {:.1})",
            mb(self.total),
            mb(self.anon),
            mb(self.heap),
            mb(self.arenas),
            mb(self.other_anon),
            mb(self.rings),
            mb(self.binary),
            mb(self.libs),
            mb(self.shmem),
            mb(self.total.saturating_sub(self.rings)),
            mb(self.hwm)
        )
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Nanoseconds on CPU of all the process's threads (schedstat).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    rd.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

impl Bench {
    fn daemon_pid(&self) -> Result<u32> {
        self.daemon.as_ref().map(Child::id).ok_or_else(|| anyhow!("bench: no daemon running"))
    }

    fn exec_spec(&self) -> Result<usize> {
        self.specs
            .iter()
            .position(|s| s.kind == Kind::Exec)
            .ok_or_else(|| anyhow!("bench: no fork+exec spec"))
    }

    /// A shell exec'ing `cmd` in a tight loop, each time with a differently named
    /// variable and a credential-shaped one, in the bench cgroup, leading its own process
    /// group (killed with `stop_storm`).
    fn storm(&self, cmd: &str) -> Result<Child> {
        let mut c = Command::new("sh");
        grants::join_before_exec(
            &mut c,
            std::ffi::CString::new(
                self.cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes(),
            )?,
        );
        c.args([
            "-c",
            &format!(
                "i=0; while :; do i=$((i+1)); env STORM_$((i % 1000))=v$i STORM_API_TOKEN=t$i {cmd}; done"
            ),
        ])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c.spawn().context("bench: cannot start the exec storm")
    }

    fn execs_seen(&self) -> Result<u64> {
        self.status_json()?
            .pointer("/counts/execs")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| anyhow!("bench: status JSON has no counts.execs"))
    }

    /// fork+exec /bin/true while the storm runs: rounds alternating which phase comes first.
    /// Each round's figure is the median of its per-call times (a preempted call moves a
    /// round's mean by percents, its median hardly); the row's ratio is the median of the
    /// with-rounds over the median of the without-rounds, the means' ratio beside it.
    fn exec_storm(&mut self) -> Result<Vec<Row>> {
        let spec = self.exec_spec()?;
        let mut storm = self.storm("/bin/true")?;
        let r = self.exec_storm_rounds(spec);
        stop_storm(&mut storm);
        let rounds = r?;
        let p50 = |with: bool| -> Vec<f64> {
            rounds.iter().filter(|r| r.with == with).map(|r| r.p50_ns).collect()
        };
        let mean = |with: bool| -> Vec<f64> {
            rounds.iter().filter(|r| r.with == with).map(|r| r.mean_ns).collect()
        };
        let us = |v: &[f64]| v.iter().map(|x| (x / 1e3) as u64).collect::<Vec<_>>();
        let (a, b) = (median(&p50(false)), median(&p50(true)));
        let ratio = b / a;
        let wall_ratio = median(&mean(true)) / median(&mean(false));
        let cpu: Vec<f64> = rounds.iter().filter_map(|r| r.cpu_us_per_exec).collect();
        let env_reads = rounds.iter().rev().find_map(|r| r.env_reads.clone()).unwrap_or_default();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load = load.split_whitespace().next().unwrap_or("?").to_string();
        Ok(vec![
            Row {
                name: format!(
                    "fork+exec /bin/true while an exec storm with changing environments runs in the cgroup \
                     (per-call median of N={PROBE_EXECS} per round, {STORM_ROUNDS} interleaved rounds; \
                     round medians without {:?} us, with {:?} us; means' ratio {wall_ratio:.3}, \
                     round means without {:?} us, with {:?} us; load {load})",
                    us(&p50(false)),
                    us(&p50(true)),
                    us(&mean(false)),
                    us(&mean(true)),
                ),
                without: format!("{:.1} us", a / 1e3),
                with: format!("{:.1} us", b / 1e3),
                ratio: format!("{ratio:.3}"),
                target: format!("<= {RATIO_MAX:.2}"),
                pass: Some(ratio <= RATIO_MAX),
            },
            Row {
                name: "daemon CPU per exec record during those rounds (all threads, schedstat; storm + probe execs)"
                    .into(),
                without: "-".into(),
                with: format!(
                    "{:.1} us per exec (rounds {:?}); environment reads: {env_reads}",
                    median(&cpu),
                    cpu.iter().map(|x| *x as u64).collect::<Vec<_>>()
                ),
                ratio: "-".into(),
                target: "-".into(),
                pass: None,
            },
        ])
    }

    /// One probe: `n` fork+exec of the spec's target timed call by call.
    fn exec_probe(&self, spec: usize, n: u64) -> Result<(f64, f64)> {
        let s = &self.specs[spec];
        let mut c = self.worker_cmd()?;
        c.arg("bench-worker")
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(["--kind", "exec", "--target", &s.target, "--n", &n.to_string(), "--per-op"])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        let out = c.output().context("bench: cannot start the exec probe")?;
        check_interrupted()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse::<f64>().ok())
        };
        match (out.status.success(), field("ns="), field("ops="), field("p50=")) {
            (true, Some(ns), Some(ops), Some(p50)) if ops > 0.0 => Ok((ns / ops, p50)),
            _ => bail!("bench: exec probe failed ({}): {text:?}", out.status),
        }
    }

    fn exec_storm_rounds(&mut self, spec: usize) -> Result<Vec<StormRound>> {
        let mut rounds = Vec::new();
        // Warm-up of the probe and the storm.
        self.exec_probe(spec, PROBE_EXECS / 4)?;
        for round in 0..STORM_ROUNDS {
            for daemon_first in [round % 2 == 0, round % 2 != 0] {
                check_interrupted()?;
                if !daemon_first {
                    let (mean_ns, p50_ns) = self.exec_probe(spec, PROBE_EXECS)?;
                    rounds.push(StormRound {
                        with: false,
                        mean_ns,
                        p50_ns,
                        cpu_us_per_exec: None,
                        env_reads: None,
                    });
                    continue;
                }
                self.start_daemon(false)?;
                let pid = self.daemon_pid()?;
                let (e0, c0) = (self.execs_seen()?, cpu_ns(pid));
                let (mean_ns, p50_ns) = self.exec_probe(spec, PROBE_EXECS)?;
                let c1 = cpu_ns(pid);
                // The status is refreshed about once a second: wait for the counts to cover
                // the probe.
                std::thread::sleep(Duration::from_millis(1200));
                let st = self.status_json()?;
                let e1 = st.pointer("/counts/execs").and_then(|v| v.as_u64()).unwrap_or(e0);
                rounds.push(StormRound {
                    with: true,
                    mean_ns,
                    p50_ns,
                    cpu_us_per_exec: (e1 > e0).then(|| (c1 - c0) as f64 / 1e3 / (e1 - e0) as f64),
                    env_reads: st.pointer("/env_reads").map(|v| v.to_string()),
                });
                self.stop_daemon()?;
            }
            let last = |with: bool| rounds.iter().rev().find(|r| r.with == with);
            let (w, wo) = (last(true), last(false));
            println!(
                "bench: attack: exec storm round {}/{STORM_ROUNDS}: fork+exec per-call median without {:.1}us, with {:.1}us (means {:.1} / {:.1}); daemon CPU per exec {}",
                round + 1,
                wo.map_or(0.0, |r| r.p50_ns / 1e3),
                w.map_or(0.0, |r| r.p50_ns / 1e3),
                wo.map_or(0.0, |r| r.mean_ns / 1e3),
                w.map_or(0.0, |r| r.mean_ns / 1e3),
                w.and_then(|r| r.cpu_us_per_exec).map_or("?".into(), |c| format!("{c:.1}us")),
            );
        }
        Ok(rounds)
    }

    /// Idle RSS, then the soak with RSS samples, then RSS after it.
    fn rss_soak(&mut self) -> Result<Vec<Row>> {
        self.start_daemon(false)?;
        let pid = self.daemon_pid()?;
        std::thread::sleep(Duration::from_secs(2));
        let idle = Rss::read(pid)?;
        println!("bench: attack: idle RSS {}", idle.show());
        let secret = self.tmp.join("secrets").join("secret.txt");
        let secret = secret.display().to_string().replace('\'', "'\\''");
        let mut storm = self.storm(&format!("cat '{secret}'"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let api = {
            let (sock, stop, requests) = (self.mint_sock(), stop.clone(), requests.clone());
            std::thread::spawn(move || api_flood(&sock, &stop, &requests))
        };
        let t0 = Instant::now();
        let mut samples = Vec::new();
        let soak = soak_length();
        let r = (|| -> Result<()> {
            while t0.elapsed() < soak {
                std::thread::sleep(SAMPLE_EVERY);
                check_interrupted()?;
                let rss = Rss::read(pid)?;
                let memory = self.status_json().ok().and_then(|s| s.get("memory").cloned());
                println!(
                    "bench: attack: soak at {} s: {}; {}",
                    t0.elapsed().as_secs(),
                    rss.show(),
                    memory.map(|m| m.to_string()).unwrap_or_default()
                );
                samples.push((t0.elapsed().as_secs(), rss));
            }
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        stop_storm(&mut storm);
        let api_errors = api.join().map_err(|_| anyhow!("bench: API flood thread panicked"))?;
        r?;
        std::thread::sleep(Duration::from_secs(3));
        let after = Rss::read(pid)?;
        let st = self.status_json()?;
        let execs = st.pointer("/counts/execs").and_then(|v| v.as_u64()).unwrap_or(0);
        let opens = st.pointer("/counts/file_opens").and_then(|v| v.as_u64()).unwrap_or(0);
        let n_api = requests.load(Ordering::SeqCst);
        println!(
            "bench: attack: soak {}s: {execs} execs, {opens} secret opens, {n_api} API requests ({api_errors} failed); RSS (s, MB): {:?}; 3 s after: {}",
            soak.as_secs(),
            samples
                .iter()
                .map(|(s, r)| (*s, (mb(r.total) * 10.0).round() / 10.0))
                .collect::<Vec<_>>(),
            after.show()
        );
        self.stop_daemon()?;
        // Flat: every sample after the first third (the warm-up: tables, caches and arenas
        // reach their working size) within GROWTH_MAX of the one at its end. Where it grew is
        // reported by third: a cache filling grows in the second third and stops; a leak
        // keeps growing through the last one too.
        let (warm_at, mid_at) = (samples.len() / 3, samples.len() * 2 / 3);
        let warm = samples.get(warm_at).map(|s| s.1).ok_or_else(|| anyhow!("bench: no samples"))?;
        let peak = |from: usize, to: usize| {
            samples[from..to.min(samples.len())].iter().map(|s| s.1.total).max().unwrap_or(0)
        };
        let max = peak(0, samples.len()).max(after.total);
        let second = peak(warm_at, mid_at + 1);
        let growth = peak(warm_at, samples.len()).max(after.total).saturating_sub(warm.total);
        let growth_second = second.saturating_sub(warm.total);
        let growth_last = peak(mid_at, samples.len()).max(after.total).saturating_sub(second);
        Ok(vec![
            Row {
                name: "daemon RSS idle, 2 s after start (VmRSS; smaps breakdown)".into(),
                without: "-".into(),
                with: idle.show(),
                ratio: "-".into(),
                target: format!("<= {} MB", IDLE_RSS_MAX_KB / 1024),
                pass: Some(idle.total <= IDLE_RSS_MAX_KB),
            },
            Row {
                name:
                    "daemon peak RSS of its start-up (VmHWM 2 s after start: the kernel's BTF is \
                       parsed once and dropped before the main loop)"
                        .into(),
                without: "-".into(),
                with: format!("{:.1} MB (idle VmRSS {:.1} MB)", mb(idle.hwm), mb(idle.total)),
                ratio: "-".into(),
                target: "-".into(),
                pass: None,
            },
            Row {
                name: format!(
                    "daemon RSS through a {} s soak ({execs} execs with changing environments, each opening the secret; \
                     {n_api} API requests on fresh connections), 3 s after it",
                    soak.as_secs()
                ),
                without: "-".into(),
                with: format!(
                    "{}; at {} s {:.1} MB, max {:.1} MB, growth after it {:.1} MB \
                     (to the second third's peak {:.1}, beyond it in the last third {:.1}: {})",
                    after.show(),
                    samples[warm_at].0,
                    mb(warm.total),
                    mb(max),
                    mb(growth),
                    mb(growth_second),
                    mb(growth_last),
                    if growth_last <= 512 { "levelled off" } else { "still growing" }
                ),
                ratio: "-".into(),
                target: format!("flat: <= +{} MB after the first third", GROWTH_MAX_KB / 1024),
                pass: Some(growth <= GROWTH_MAX_KB && api_errors * 10 <= n_api.max(1)),
            },
        ])
    }
}

/// One probe of the exec-storm rows.
struct StormRound {
    with: bool,
    /// Mean and per-call median of one fork+exec, ns.
    mean_ns: f64,
    p50_ns: f64,
    /// Daemon CPU per exec record (with-rounds).
    cpu_us_per_exec: Option<f64>,
    env_reads: Option<String>,
}

fn soak_length() -> Duration {
    std::env::var("ENFORCER_BENCH_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(SOAK, Duration::from_secs)
}

fn stop_storm(storm: &mut Child) {
    // SAFETY: signals the storm's own process group (it was made its leader).
    unsafe { libc::killpg(storm.id() as i32, libc::SIGKILL) };
    let _ = storm.wait();
}

/// API requests on fresh connections until `stop`: listings and grant requests for the
/// caller (refused by quota or rate at times: still requests the daemon must answer).
/// Returns the number that failed at the transport level.
fn api_flood(sock: &std::path::Path, stop: &AtomicBool, requests: &AtomicU64) -> u64 {
    let mut failed = 0;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let req: Vec<u8> = if n % 2 == 1 {
            let body = format!("{{\"intent\": \"{}\", \"ttl\": \"2s\"}}", grants::INTENT);
            format!(
                "POST /v1/grants HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        } else {
            b"GET /v1/grants?state=active HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()
        };
        let ok = (|| -> std::io::Result<()> {
            let mut s = UnixStream::connect(sock)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(&req)?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf)?;
            Ok(())
        })();
        if ok.is_err() {
            failed += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        n += 1;
        requests.store(n, Ordering::SeqCst);
    }
    failed
}
