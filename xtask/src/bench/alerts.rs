//! Alert-stream rounds: a worker that is an `[[agent]]` (selected by the bench cgroup, joined
//! before exec) and holds no grant sends paced UDP datagrams to loopback; in monitor mode every
//! `sendto` is an `out_of_intent` alert. Measured: events appended to the outbox
//! (`<state_dir>/events.jsonl` and its backups) per second, alerts delivered to one sink per
//! second (a file sink, or a Splunk HEC receiver over TLS run in this process) from the first
//! to the last delivered, and the daemon's RSS sampled during the load.

mod hec;

use super::check_interrupted;
use super::harness::{Bench, run_worker};
use super::report::{Row, median, split_rounds};
use anyhow::{Context, Result, anyhow, bail};
use hec::{HEC_TOKEN, HecReceiver};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sends per second over all flood threads, and for how long.
pub const ALERT_RATE: u64 = 100_000;
pub const ALERT_SECS: f64 = 5.0;
const ALERT_THREADS: u64 = 2;
/// Targets: alerts/s delivered to the file sink, daemon RSS under that load.
const FILE_RATE_MIN: f64 = 50_000.0;
const RSS_MAX_MB: f64 = 64.0;
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// How long the sink may take to deliver the backlog after the flood ended.
const CATCH_UP_MAX: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum SinkKind {
    File,
    Hec,
}

impl SinkKind {
    fn name(self) -> &'static str {
        match self {
            SinkKind::File => "file",
            SinkKind::Hec => "splunk_hec",
        }
    }
}

pub struct AlertRound {
    sink: SinkKind,
    sent: u64,
    send_secs: f64,
    drops: u64,
    /// Lines appended to the outbox during the round, and the time from the first to the last.
    outbox: u64,
    outbox_secs: f64,
    /// Of them, alerts (verdict other than allowed).
    alerts: u64,
    /// Events delivered to the sink during the round, and the time from the first to the last.
    delivered: u64,
    deliver_secs: f64,
    /// The sink's cursor reached the end of the outbox before CATCH_UP_MAX.
    caught_up: bool,
    /// Seconds from the end of the flood until the sink had caught up.
    lag_secs: f64,
    /// VmRSS just before the flood.
    idle_rss_kb: u64,
    max_rss_kb: u64,
    hwm_kb: u64,
}

impl AlertRound {
    fn outbox_rate(&self) -> f64 {
        self.outbox as f64 / self.outbox_secs.max(1e-9)
    }
    fn deliver_rate(&self) -> f64 {
        self.delivered as f64 / self.deliver_secs.max(1e-9)
    }
    pub fn summary(&self) -> String {
        format!(
            "{}: sent {:.1}k/s, outbox {} events ({} alerts) at {:.1}k/s, delivered {} at {:.1}k/s{} (caught up {:.1}s after the flood), \
             {} drops, VmRSS idle {:.1} MB, max {:.1} MB, VmHWM {:.1} MB",
            self.sink.name(),
            self.sent as f64 / self.send_secs / 1e3,
            self.outbox,
            self.alerts,
            self.outbox_rate() / 1e3,
            self.delivered,
            self.deliver_rate() / 1e3,
            if self.caught_up { "" } else { " (NOT caught up)" },
            self.lag_secs,
            self.drops,
            self.idle_rss_kb as f64 / 1024.0,
            self.max_rss_kb as f64 / 1024.0,
            self.hwm_kb as f64 / 1024.0,
        )
    }
}

fn toml_str(p: &Path) -> String {
    format!("\"{}\"", p.display().to_string().replace('\\', "\\\\").replace('"', "\\\""))
}

/// One sample of the progress counters.
#[derive(Clone, Copy)]
struct Sample {
    t: f64,
    outbox_bytes: u64,
    sink: u64,
    rss_kb: u64,
}

/// Outbox files, oldest first (backups `.N` .. `.1`, then the live file).
fn generations(live: &Path) -> Vec<PathBuf> {
    let numbered = |i: u32| PathBuf::from(format!("{}.{i}", live.display()));
    let mut v: Vec<PathBuf> = (1..).map(numbered).take_while(|p| p.exists()).collect();
    v.reverse();
    v.push(live.to_path_buf());
    v
}

fn total_bytes(live: &Path) -> u64 {
    generations(live).iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
}

/// Lines in all generations of `live`, and of them lines containing `needle`.
fn count_lines(live: &Path, needle: &[u8]) -> Result<(u64, u64)> {
    let (mut lines, mut hits) = (0u64, 0u64);
    for p in generations(live) {
        let mut f = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("bench: cannot read {}", p.display()))
                );
            }
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut line: Vec<u8> = Vec::new();
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let mut rest = &buf[..n];
            while let Some(i) = rest.iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&rest[..i]);
                lines += 1;
                if !needle.is_empty() && line.windows(needle.len()).any(|w| w == needle) {
                    hits += 1;
                }
                line.clear();
                rest = &rest[i + 1..];
            }
            line.extend_from_slice(rest);
        }
    }
    Ok((lines, hits))
}

fn proc_status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key).map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// The sink's committed cursor `(ino, offset)` from `<state_dir>/sinks/<name>.cursor`.
fn cursor(state: &Path, sink: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(state.join("sinks").join(format!("{sink}.cursor"))).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some((v.get("ino")?.as_u64()?, v.get("offset")?.as_u64()?))
}

/// The sink has delivered everything in the outbox: its cursor is at the end of the live file.
fn caught_up(state: &Path, sink: &str) -> bool {
    let live = state.join("events.jsonl");
    let (Ok(m), Some((ino, off))) = (std::fs::metadata(&live), cursor(state, sink)) else {
        return false;
    };
    m.ino() == ino && m.len() == off
}

/// First and last time `value` grew after `from` (the sample at the flood start).
fn growth_span(samples: &[Sample], from: usize, value: impl Fn(&Sample) -> u64) -> Option<f64> {
    let base = value(&samples[from]);
    let end = value(samples.last()?);
    let first = samples[from..].iter().find(|s| value(s) > base)?;
    let last = samples[from..].iter().find(|s| value(s) == end)?;
    // Growth seen at sample k happened within the interval before it: count one interval.
    Some((last.t - first.t).max(0.0) + SAMPLE_EVERY.as_secs_f64())
}

impl Bench {
    /// One daemon in monitor mode with the bench cgroup as an `[[agent]]` and one sink; a paced
    /// UDP flood by an agent worker without a grant; measured until the sink caught up.
    /// `--only alerts`: the alert-stream rounds alone (file, then HEC, per round).
    pub(super) fn alert_rows(&mut self, iterations: usize) -> Result<Vec<Row>> {
        let mut rounds = Vec::new();
        for round in 0..iterations {
            self.alert_rounds_of(round, iterations, &mut rounds)?;
        }
        Ok(rows(&rounds))
    }

    /// Round `round` of the alert stream: a file-sink then a HEC-sink round, each logged and
    /// pushed to `out` (a failed round is kept as its error).
    pub(super) fn alert_rounds_of(
        &mut self,
        round: usize,
        iterations: usize,
        out: &mut Vec<Result<AlertRound>>,
    ) -> Result<()> {
        for kind in [SinkKind::File, SinkKind::Hec] {
            let r = self.alert_round(kind, round);
            check_interrupted()?;
            match &r {
                Ok(a) => {
                    println!("bench: round {}/{iterations} alerts: {}", round + 1, a.summary())
                }
                Err(e) => println!(
                    "bench: round {}/{iterations} alerts ({kind:?}): error: {e:#}",
                    round + 1
                ),
            }
            out.push(r);
        }
        Ok(())
    }

    pub(super) fn alert_round(&mut self, kind: SinkKind, n: usize) -> Result<AlertRound> {
        let dir = self.tmp.join(format!("alerts-{}-{n}", kind.name()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("bench: cannot create {}", dir.display()))?;
        let r = self.alert_round_in(kind, &dir);
        let _ = self.stop_daemon();
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    fn alert_round_in(&mut self, kind: SinkKind, dir: &Path) -> Result<AlertRound> {
        let state = dir.join("state");
        let sink_file = dir.join("sink").join("alerts.jsonl");
        let hec = match kind {
            SinkKind::Hec => Some(HecReceiver::start(dir)?),
            SinkKind::File => None,
        };
        // The monitor config with its own state dir (the outbox grows by hundreds of MB), the
        // bench cgroup as an agent, larger outbox bounds (a lagging sink must lose nothing) and
        // the sink under test.
        let base = std::fs::read_to_string(&self.config)?;
        let old_state = format!("state_dir = {}", toml_str(&self.tmp.join("state")));
        if !base.contains(&old_state) {
            bail!("bench: the monitor config has no `{old_state}` line");
        }
        let rel = self
            .cgroup
            .strip_prefix(&self.cgroup_mount)
            .context("bench: cgroup outside the cgroup2 mount")?;
        let mut config = base.replace(&old_state, &format!("state_dir = {}", toml_str(&state)));
        config += &format!(
            "\n[outbox]\nrotate_bytes = 268435456\nmax_backups = 16\nmax_bytes = 17179869184\n\n\
             [[agent]]\ncgroup = {}\n\n",
            toml_str(&Path::new("/").join(rel))
        );
        config += &match &hec {
            None => format!(
                "[[sink]]\nname = \"file\"\ntype = \"file\"\npath = {}\nmax_bytes = 1073741824\n",
                toml_str(&sink_file)
            ),
            Some(h) => format!(
                "[[sink]]\nname = \"hec\"\ntype = \"splunk_hec\"\nurl = \"https://localhost:{}/services/collector/event\"\n\
                 token = \"{HEC_TOKEN}\"\nca_file = {}\n",
                h.port,
                toml_str(&h.ca)
            ),
        };
        let config_path = dir.join("enforcer-alerts.toml");
        std::fs::write(&config_path, config)?;
        let sink_name = match kind {
            SinkKind::File => "file",
            SinkKind::Hec => "hec",
        };
        self.start_daemon_with(&config_path)?;
        let pid =
            self.daemon.as_ref().map(|d| d.id()).ok_or_else(|| anyhow!("bench: no daemon"))?;
        let outbox = state.join("events.jsonl");
        // Startup events delivered first, so the baseline is quiet.
        let t0 = Instant::now();
        while !caught_up(&state, sink_name) && t0.elapsed() < Duration::from_secs(10) {
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(100));
        }
        let progress = {
            let (sink_file, events) = (sink_file.clone(), hec.as_ref().map(|h| h.events.clone()));
            move || match &events {
                Some(e) => e.load(Ordering::SeqCst),
                None => total_bytes(&sink_file),
            }
        };
        let sink_count = |p: &Path| -> Result<u64> {
            Ok(match &hec {
                Some(h) => h.events.load(Ordering::SeqCst),
                None => count_lines(p, b"")?.0,
            })
        };
        let (outbox_base, alerts_base) = count_lines(&outbox, b"\"verdict\":\"out_of_intent\"")?;
        let sink_base = sink_count(&sink_file)?;
        let before = self.status_json()?;

        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
        let sampler = {
            let (stop, samples, outbox, progress) =
                (stop.clone(), samples.clone(), outbox.clone(), progress.clone());
            let t0 = Instant::now();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let s = Sample {
                        t: t0.elapsed().as_secs_f64(),
                        outbox_bytes: total_bytes(&outbox),
                        sink: progress(),
                        rss_kb: proc_status_kb(pid, "VmRSS:"),
                    };
                    samples.lock().unwrap().push(s);
                    std::thread::sleep(SAMPLE_EVERY);
                }
            })
        };
        let result = (|| -> Result<AlertRound> {
            std::thread::sleep(SAMPLE_EVERY * 2);
            let from = samples.lock().unwrap().len().saturating_sub(1);
            let mut c = self.worker_cmd()?;
            c.arg("bench-worker")
                .arg("--cgroup")
                .arg(&self.cgroup)
                .args(["--kind", "flood", "--target", &self.udp.local_addr()?.to_string()])
                .args([
                    "--rate",
                    &ALERT_RATE.to_string(),
                    "--secs",
                    &ALERT_SECS.to_string(),
                    "--threads",
                    &ALERT_THREADS.to_string(),
                ]);
            let (ns, sent) = run_worker("alert flood", &mut c)?;
            let flood_end = Instant::now();
            // Caught up: the cursor at the end of the live outbox, twice 300 ms apart with the
            // outbox unchanged (the engine flushes its buffer on a timer).
            let mut done = false;
            let mut last = (0, false);
            while flood_end.elapsed() < CATCH_UP_MAX {
                check_interrupted()?;
                if let Some(st) = self.daemon.as_mut().and_then(|d| d.try_wait().ok().flatten()) {
                    bail!("bench: daemon exited during the alert round ({st})");
                }
                let size = total_bytes(&outbox);
                let up = caught_up(&state, sink_name);
                if up && last == (size, true) {
                    done = true;
                    break;
                }
                last = (size, up);
                std::thread::sleep(Duration::from_millis(300));
            }
            let lag_secs = flood_end.elapsed().as_secs_f64();
            // One more sampling interval, so the sampler saw the final values.
            std::thread::sleep(SAMPLE_EVERY * 3);
            let hwm_kb = proc_status_kb(pid, "VmHWM:");
            let after = self.status_json()?;
            let counter =
                |v: &serde_json::Value, p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
            let drops = counter(&after, "/kernel/ringbuf_drops")
                .saturating_sub(counter(&before, "/kernel/ringbuf_drops"));
            stop.store(true, Ordering::SeqCst);
            let samples = samples.lock().unwrap().clone();
            let (outbox_lines, alert_lines) =
                count_lines(&outbox, b"\"verdict\":\"out_of_intent\"")?;
            let delivered = sink_count(&sink_file)?.saturating_sub(sink_base);
            if let Some(h) = &hec {
                let rej = h.rejected.load(Ordering::SeqCst);
                if rej > 0 {
                    bail!(
                        "bench: the HEC receiver rejected {rej} requests (method, path or token)"
                    );
                }
            }
            Ok(AlertRound {
                sink: kind,
                sent,
                send_secs: ns as f64 / 1e9,
                drops,
                outbox: outbox_lines.saturating_sub(outbox_base),
                outbox_secs: growth_span(&samples, from, |s| s.outbox_bytes).unwrap_or(0.0),
                alerts: alert_lines.saturating_sub(alerts_base),
                delivered,
                deliver_secs: growth_span(&samples, from, |s| s.sink).unwrap_or(0.0),
                caught_up: done,
                lag_secs,
                idle_rss_kb: samples[from].rss_kb,
                max_rss_kb: samples[from..].iter().map(|s| s.rss_kb).max().unwrap_or(0),
                hwm_kb,
            })
        })();
        stop.store(true, Ordering::SeqCst);
        let _ = sampler.join();
        if let Some(h) = &hec {
            h.stop();
            for e in h.errors.lock().unwrap().iter().take(3) {
                println!("bench: alerts: HEC receiver: connection ended with an error: {e}");
            }
        }
        result
    }
}

/// Rows: alerts/s to the file sink and to HEC (median of rounds), daemon RSS under that load.
pub fn rows(rounds: &[Result<AlertRound>]) -> Vec<Row> {
    let (ok, mut rows) = split_rounds(rounds, "alert");
    for kind in [SinkKind::File, SinkKind::Hec] {
        let rs: Vec<&&AlertRound> = ok.iter().filter(|r| r.sink == kind).collect();
        if rs.is_empty() {
            continue;
        }
        let rate = median(&rs.iter().map(|r| r.deliver_rate()).collect::<Vec<_>>());
        let outbox = median(&rs.iter().map(|r| r.outbox_rate()).collect::<Vec<_>>());
        let sent = median(&rs.iter().map(|r| r.sent as f64 / r.send_secs).collect::<Vec<_>>());
        let complete = rs.iter().all(|r| r.caught_up && r.delivered >= r.outbox);
        let drops: u64 = rs.iter().map(|r| r.drops).sum();
        let per_round: Vec<String> =
            rs.iter().map(|r| format!("{:.1}k", r.deliver_rate() / 1e3)).collect();
        let (target, pass) = match kind {
            SinkKind::File => (
                format!(">= {:.0}k/s, all delivered", FILE_RATE_MIN / 1e3),
                Some(rate >= FILE_RATE_MIN && complete),
            ),
            SinkKind::Hec => ("all delivered".to_string(), Some(complete)),
        };
        rows.push(Row {
            name: format!(
                "alerts/s through the outbox to the {} sink (agent without grant, UDP sendto out_of_intent ~{}k/s for {ALERT_SECS:.0} s \
                 from {ALERT_THREADS} threads; delivered / first-to-last delivery; median of {} rounds)",
                match kind {
                    SinkKind::File => "file",
                    SinkKind::Hec => "Splunk HEC (HTTPS receiver in the bench process)",
                },
                ALERT_RATE / 1000,
                rs.len()
            ),
            without: "-".into(),
            with: format!(
                "{:.1}k/s delivered (rounds {}; {} of {} events each{}); outbox {:.1}k/s, sent {:.1}k/s, {drops} ring-buffer drops; \
                 backlog delivered {:.1} s after the flood",
                rate / 1e3,
                per_round.join(", "),
                rs.iter().map(|r| r.delivered.to_string()).collect::<Vec<_>>().join("/"),
                rs.iter().map(|r| r.outbox.to_string()).collect::<Vec<_>>().join("/"),
                if complete { "" } else { ", NOT all delivered" },
                outbox / 1e3,
                sent / 1e3,
                median(&rs.iter().map(|r| r.lag_secs).collect::<Vec<_>>()),
            ),
            ratio: "-".into(),
            target,
            pass,
        });
    }
    if !ok.is_empty() {
        let mb = |kb: u64| kb as f64 / 1024.0;
        let max_of = |k: SinkKind| ok.iter().filter(|r| r.sink == k).map(|r| r.max_rss_kb).max();
        let max_rss = ok.iter().map(|r| r.max_rss_kb).max().unwrap_or(0);
        let hwm = ok.iter().map(|r| r.hwm_kb).max().unwrap_or(0);
        let idle = median(&ok.iter().map(|r| r.idle_rss_kb as f64).collect::<Vec<_>>());
        let part = |k: SinkKind| max_of(k).map(|v| format!("{} {:.1} MB", k.name(), mb(v)));
        rows.push(Row {
            name: format!(
                "daemon RSS under the alert load (VmRSS sampled every {} ms from the flood start until the sink caught up; max of rounds)",
                SAMPLE_EVERY.as_millis()
            ),
            without: "-".into(),
            with: format!(
                "max {:.1} MB ({}); VmHWM (lifetime peak) {:.1} MB; idle before the flood {:.1} MB (median)",
                mb(max_rss),
                [part(SinkKind::File), part(SinkKind::Hec)].into_iter().flatten().collect::<Vec<_>>().join(", "),
                mb(hwm),
                idle / 1024.0
            ),
            ratio: "-".into(),
            target: format!("<= {RSS_MAX_MB:.0} MB"),
            pass: Some(mb(max_rss) <= RSS_MAX_MB),
        });
    }
    rows
}
