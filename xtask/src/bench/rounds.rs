//! The measured rounds: interleaved phases without the daemon (A), with it in monitor mode (B:
//! the overhead loops, grant issuance and connects with many live grants, the ring-buffer flood
//! in the last round) and in enforce mode (C: the overhead loops, then violation-to-denial),
//! then the alert-stream rounds; their results as report rows.

use super::grants::{self, CLIENTS, GRANTS_PER_HOLDER, N_GRANTS, N_HOLDERS};
use super::harness::{Bench, run_worker};
use super::report::{Row, enforce_rows, grant_rows, median};
use super::{
    EPERM, FLOOD_RATE, FLOOD_SECS, ISSUE_P99_MAX, SECRET_OPENS, Spec, VIOLATION_CONNECTS, alerts,
    check_interrupted,
};
use anyhow::{Result, anyhow, bail};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

impl Bench {
    /// Rounds of A (no daemon), B (monitor mode, with the grant round, and the drop test in
    /// the last one) and C (enforce mode: overhead loops, then violation-to-denial timings),
    /// in an order that rotates per round.
    pub(super) fn measure(&mut self, iterations: usize) -> Result<Vec<Row>> {
        println!("bench: warm-up");
        for i in 0..self.specs.len() {
            let n = (self.specs[i].n / 10).max(1);
            self.worker(i, Some(n))?;
        }
        let mut per_op = vec![[Vec::new(), Vec::new()]; self.specs.len()];
        // The rows with a target, again with the daemon in enforce mode (C vs A).
        let enforce_specs: Vec<usize> =
            (0..self.specs.len()).filter(|&i| self.specs[i].limit.is_some()).collect();
        let mut enforce_op = vec![Vec::new(); enforce_specs.len()];
        let mut flood = None;
        // Connect per op (ns) after the other loops: A = no daemon, B = N_GRANTS live grants.
        let mut loaded = [Vec::new(), Vec::new()];
        // Connect per op (ns) by a worker that holds a grant (B) / the same worker without daemon (A).
        let mut holder = [Vec::new(), Vec::new()];
        let mut grant_rounds = Vec::new();
        // Per-call medians without the daemon (A): connect to `tcp`, open of the secret.
        let mut base_connect = Vec::new();
        let mut base_open = Vec::new();
        let mut enforce_rounds = Vec::new();
        let mut alert_rounds = Vec::new();
        for round in 0..iterations {
            // The order rotates per round, so no phase always follows the same one (e.g. the
            // enforce loops right after the monitor round's 2500 holders were killed).
            let mut phases = [Phase::Without, Phase::Monitor, Phase::Enforce];
            phases.rotate_left(round % 3);
            for phase in phases {
                match phase {
                    Phase::Without => {}
                    Phase::Monitor => self.start_daemon(false)?,
                    Phase::Enforce => self.start_daemon(true)?,
                }
                if phase == Phase::Enforce {
                    for (k, &i) in enforce_specs.iter().enumerate() {
                        enforce_op[k].push(self.worker(i, None)?.0 as f64 / self.specs[i].n as f64);
                    }
                    println!(
                        "bench: round {}/{iterations} enforce mode: {}",
                        round + 1,
                        enforce_op
                            .iter()
                            .map(|v| format!("{:.2}us", v[round] / 1e3))
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                    let r = self.enforce_round();
                    check_interrupted()?;
                    match &r {
                        Ok(e) => println!(
                            "bench: round {}/{iterations} enforce: connect p50 allowed {:.2}us denied {:.2}us; secret open p50 \
                             denied {:.2}us allowed {:.2}us; file_decision_us denied p50/p99/max {}/{}/{}, allowed {}/{}/{}",
                            round + 1,
                            e.connect_allowed as f64 / 1e3,
                            e.connect_denied as f64 / 1e3,
                            e.open_denied as f64 / 1e3,
                            e.open_allowed as f64 / 1e3,
                            e.denied.p50,
                            e.denied.p99,
                            e.denied.max,
                            e.allowed.p50,
                            e.allowed.p99,
                            e.allowed.max,
                        ),
                        Err(e) => println!(
                            "bench: round {}/{iterations} enforce: error: {e:#}",
                            round + 1
                        ),
                    }
                    enforce_rounds.push(r);
                    self.stop_daemon()?;
                    continue;
                }
                let with = phase == Phase::Monitor;
                for (i, times) in per_op.iter_mut().enumerate() {
                    let ns = self.worker(i, None)?.0 as f64 / self.specs[i].n as f64;
                    times[with as usize].push(ns);
                }
                println!(
                    "bench: round {}/{iterations} {}: {}",
                    round + 1,
                    if with { "with daemon" } else { "without" },
                    per_op
                        .iter()
                        .map(|v| format!("{:.2}us", v[with as usize][round] / 1e3))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                if with {
                    let r = self.grant_round();
                    self.release_holders();
                    check_interrupted()?;
                    match &r {
                        Ok(g) => {
                            loaded[1].push(g.loaded_ns);
                            holder[1].push(g.holder_ns);
                        }
                        Err(e) => {
                            println!("bench: round {}/{iterations} grants: error: {e:#}", round + 1)
                        }
                    }
                    grant_rounds.push(r);
                    if round + 1 == iterations {
                        flood = Some(self.flood());
                    }
                    self.stop_daemon()?;
                } else {
                    loaded[0].push(self.worker(0, None)?.0 as f64 / self.specs[0].n as f64);
                    holder[0].push(self.holder_connect(false)?);
                    let tcp = self.tcp.to_string();
                    let secret = self.specs[SECRET_SPEC].target.clone();
                    base_connect.push(
                        self.bound_worker(
                            "connect per call",
                            "connect",
                            &tcp,
                            VIOLATION_CONNECTS,
                            false,
                            None,
                        )?
                        .p50()?,
                    );
                    base_open.push(
                        self.bound_worker(
                            "secret open per call",
                            "open",
                            &secret,
                            SECRET_OPENS,
                            false,
                            None,
                        )?
                        .p50()?,
                    );
                    println!(
                        "bench: round {}/{iterations} without: connect {:.2}us, connect (holder handshake) {:.2}us; \
                         per call p50: connect {:.2}us, secret open {:.2}us",
                        round + 1,
                        loaded[0][round] / 1e3,
                        holder[0][round] / 1e3,
                        base_connect[round] as f64 / 1e3,
                        base_open[round] as f64 / 1e3,
                    );
                }
            }
            // Alert stream: its own daemons (an agent cgroup and one sink each), after the
            // round's phases.
            self.alert_rounds_of(round, iterations, &mut alert_rounds)?;
        }
        let ratio_row = |s: &Spec, a: &[f64], b: &[f64], suffix: &str| {
            let (a, b) = (median(a), median(b));
            let ratio = b / a;
            Row {
                name: format!("{} (N={}){suffix}", s.name, s.n),
                without: format!("{:.2} us", a / 1e3),
                with: format!("{:.2} us", b / 1e3),
                ratio: format!("{ratio:.3}"),
                target: s.limit.map_or("-".into(), |l| format!("<= {l:.2}")),
                pass: s.limit.map(|l| ratio <= l),
            }
        };
        let mut rows: Vec<Row> =
            self.specs.iter().zip(&per_op).map(|(s, [a, b])| ratio_row(s, a, b, "")).collect();
        rows.extend(
            enforce_specs
                .iter()
                .zip(&enforce_op)
                .map(|(&i, c)| ratio_row(&self.specs[i], &per_op[i][0], c, ", enforce mode")),
        );
        rows.push(match flood.expect("last round ran the flood") {
            Ok(f) => Row {
                name: format!(
                    "ring-buffer drops, UDP sendto flood ~{}k/s for {FLOOD_SECS:.0} s",
                    FLOOD_RATE / 1000
                ),
                without: "-".into(),
                with: format!(
                    "{} drops; {:.1}k events/s (sent {:.1}k/s)",
                    f.drops,
                    f.events as f64 / f.secs / 1e3,
                    f.sent as f64 / f.secs / 1e3
                ),
                ratio: "-".into(),
                target: "0 drops".into(),
                pass: Some(f.drops == 0),
            },
            Err(e) => Row {
                name: "ring-buffer drops".into(),
                without: "-".into(),
                with: format!("error: {e:#}"),
                ratio: "-".into(),
                target: "0 drops".into(),
                pass: Some(false),
            },
        });
        rows.extend(grant_rows(&grant_rounds, &loaded, &holder, self.specs[0].n));
        rows.extend(enforce_rows(&enforce_rounds, &base_connect, &base_open));
        rows.extend(alerts::rows(&alert_rounds));
        Ok(rows)
    }

    /// With the daemon in enforce mode: per-call connects by a grant holder inside and outside
    /// its intent, then secret opens without a grant (denied) and by a grant holder (allowed),
    /// each followed by the daemon's `file_decision_us`.
    fn enforce_round(&mut self) -> Result<EnforceRound> {
        let (tcp, out) = (self.tcp.to_string(), self.tcp_out.to_string());
        let secret = self.specs[SECRET_SPEC].target.clone();
        let connect_allowed = self
            .bound_worker(
                "connect inside the intent",
                "connect",
                &tcp,
                VIOLATION_CONNECTS,
                true,
                None,
            )?
            .p50()?;
        let connect_denied = self
            .bound_worker(
                "connect outside the intent",
                "connect",
                &out,
                VIOLATION_CONNECTS,
                true,
                Some(EPERM),
            )?
            .p50()?;
        let before = self.file_decisions(0)?.count;
        let open_denied = self
            .bound_worker(
                "secret open without a grant",
                "open",
                &secret,
                SECRET_OPENS,
                false,
                Some(EPERM),
            )?
            .p50()?;
        let denied = self.file_decisions(before + SECRET_OPENS)?;
        let open_allowed = self
            .bound_worker(
                "secret open by a grant holder",
                "open",
                &secret,
                SECRET_OPENS,
                true,
                None,
            )?
            .p50()?;
        let allowed = self.file_decisions(denied.count + SECRET_OPENS)?;
        // The same grant holder's open of a plain file under the same daemon: the secret-open
        // cost of the fanotify backend is the ratio of the two.
        let plain = self.tmp.join("plain.txt").display().to_string();
        let open_plain = self
            .bound_worker("plain open by a grant holder", "open", &plain, SECRET_OPENS, true, None)?
            .p50()?;
        // Issue 13 case 1: the same denied opens while a sparse 2 TiB copy of cat opens the
        // secret in a loop (its alerts' exe hash is refused by size, off the decision path).
        let mut attacker = self.case1_attacker(&secret)?;
        let attacked_open = self.bound_worker(
            "secret open without a grant, 2 TiB attacker running",
            "open",
            &secret,
            SECRET_OPENS,
            false,
            Some(EPERM),
        );
        // SAFETY: signals the attacker's own process group (it was made its leader).
        unsafe { libc::killpg(attacker.id() as i32, libc::SIGKILL) };
        let _ = attacker.wait();
        let open_attacked = attacked_open?.p50()?;
        let attacked = self.file_decisions(allowed.count + SECRET_OPENS)?;
        Ok(EnforceRound {
            open_attacked,
            attacked,
            connect_allowed,
            connect_denied,
            open_denied,
            open_allowed,
            open_plain,
            denied,
            allowed,
        })
    }

    /// A shell looping a sparse 2 TiB copy of `cat` over the secret, in the bench cgroup, as
    /// the leader of its own process group.
    fn case1_attacker(&self, secret: &str) -> Result<Child> {
        use std::os::unix::process::CommandExt;
        let big =
            std::env::temp_dir().join(format!("enforcer-bench-bigcat-{}", std::process::id()));
        let _ = std::fs::remove_file(&big);
        std::fs::copy("/bin/cat", &big)?;
        std::fs::File::options().write(true).open(&big)?.set_len(2 << 40)?;
        let mut c = Command::new("sh");
        grants::join_before_exec(
            &mut c,
            std::ffi::CString::new(
                self.cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes(),
            )?,
        );
        c.args(["-c", "while :; do \"$0\" \"$1\" >/dev/null 2>&1; done"])
            .arg(&big)
            .arg(secret)
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = c.spawn()?;
        // The running copies keep the inode; the name can go at once.
        std::thread::sleep(Duration::from_millis(200));
        let _ = std::fs::remove_file(&big);
        Ok(child)
    }

    /// `file_decision_us` from the status, polled (it is refreshed about once a second) until
    /// its count reaches `min_count`.
    fn file_decisions(&self, min_count: u64) -> Result<Decisions> {
        let t0 = Instant::now();
        loop {
            let v = self.status_json()?;
            let f = |k: &str| {
                v.pointer(&format!("/file_decision_us/{k}"))
                    .and_then(|x| x.as_u64())
                    .ok_or_else(|| anyhow!("bench: status JSON has no file_decision_us.{k}"))
            };
            let d =
                Decisions { count: f("count")?, p50: f("p50")?, p99: f("p99")?, max: f("max")? };
            if d.count >= min_count {
                return Ok(d);
            }
            if t0.elapsed() > Duration::from_secs(5) {
                bail!(
                    "bench: file_decision_us.count is {} 5 s after the opens, expected >= {min_count}",
                    d.count
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// With the daemon running: start the holders, issue N_GRANTS grants to them, then the
    /// connect loops with all of them live. The caller releases the holders on every path.
    pub(super) fn grant_round(&mut self) -> Result<GrantRound> {
        let t0 = Instant::now();
        grants::spawn_holders(N_HOLDERS, &self.cgroup, &mut self.holders, check_interrupted)?;
        println!(
            "bench: grants: {N_HOLDERS} holders started in {:.2}s",
            t0.elapsed().as_secs_f64()
        );
        let pids: Vec<u32> = self.holders.iter().map(Child::id).collect();
        let sock = self.mint_sock();
        println!(
            "bench: grants: issuing {N_GRANTS} ({GRANTS_PER_HOLDER} per holder) over {CLIENTS} keep-alive connections from one thread, {:.0}/s offered",
            grants::OFFERED_RATE
        );
        let daemon =
            self.daemon.as_ref().map(Child::id).ok_or_else(|| anyhow!("bench: no daemon"))?;
        let issuance = grants::issue_all(&sock, &pids, GRANTS_PER_HOLDER, daemon)?;
        check_interrupted()?;
        let mut sorted = issuance.latencies.clone();
        sorted.sort_unstable();
        println!(
            "bench: grants: {} issued, {} failed in {:.2}s ({:.0} grants/s); p50 {}, p90 {}, p99 {}, max {}; {} requests > {} ms",
            issuance.ok,
            issuance.failures,
            issuance.wall.as_secs_f64(),
            issuance.latencies.len() as f64 / issuance.wall.as_secs_f64(),
            grants::fmt_ns(grants::quantile(&sorted, 0.50)),
            grants::fmt_ns(grants::quantile(&sorted, 0.90)),
            grants::fmt_ns(grants::quantile(&sorted, 0.99)),
            grants::fmt_ns(sorted.last().copied().unwrap_or(0)),
            sorted.iter().filter(|&&ns| ns as u128 > ISSUE_P99_MAX.as_nanos()).count(),
            ISSUE_P99_MAX.as_millis(),
        );
        let per = |cpu: Duration| cpu.as_secs_f64() * 1e6 / issuance.latencies.len().max(1) as f64;
        println!(
            "bench: grants: CPU per grant: daemon {:.0} us, bench client {:.0} us; both {:.0}% of 2 cores over the issuance",
            per(issuance.daemon_cpu),
            per(issuance.client_cpu),
            (issuance.daemon_cpu + issuance.client_cpu).as_secs_f64() * 100.0
                / (2.0 * issuance.wall.as_secs_f64()),
        );
        for e in &issuance.errors {
            println!("bench: grants: failure: {e}");
        }
        // The status document is refreshed once a second.
        let live = grants::wait_live(&sock, Duration::from_secs(5), |n| n >= issuance.ok as u64)?;
        println!("bench: grants: live_grants = {live}");
        let loaded_ns = self.worker(0, None)?.0 as f64 / self.specs[0].n as f64;
        let holder_ns = self.holder_connect(true)?;
        println!(
            "bench: grants: connect with {live} live grants {:.2}us, by a grant holder {:.2}us",
            loaded_ns / 1e3,
            holder_ns / 1e3
        );
        Ok(GrantRound { issuance, live, loaded_ns, holder_ns })
    }

    /// Kill and reap the holders; with the daemon running, wait (bounded) until it has ended
    /// their grants, so the next measurement does not overlap that work.
    pub(super) fn release_holders(&mut self) {
        if self.holders.is_empty() {
            return;
        }
        let (n, t0) = (self.holders.len(), Instant::now());
        grants::kill_all(&mut self.holders);
        if self.daemon.is_some() {
            match grants::wait_live(&self.mint_sock(), Duration::from_secs(20), |n| n == 0) {
                Ok(0) => println!(
                    "bench: grants: {n} holders killed, all grants ended in {:.2}s",
                    t0.elapsed().as_secs_f64()
                ),
                Ok(live) => println!(
                    "bench: grants: warning: {live} grants still live 20 s after their holders were killed"
                ),
                Err(e) => println!("bench: grants: warning: cannot read live_grants: {e:#}"),
            }
        }
    }

    /// The connect loop of spec 0 in a worker that stops before the loop; with `grant`, a grant
    /// of the bench intent is bound to it meanwhile. ns per connect.
    fn holder_connect(&self, grant: bool) -> Result<f64> {
        let s = &self.specs[0];
        let w =
            self.bound_worker("connect by a grant holder", "connect", &s.target, s.n, grant, None)?;
        Ok(w.ns as f64 / w.ops.max(1) as f64)
    }

    fn flood(&self) -> Result<FloodResult> {
        let before = self.status_json()?;
        let mut c = self.worker_cmd()?;
        c.arg("bench-worker")
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(["--kind", "flood", "--target", &self.udp.local_addr()?.to_string()])
            .args(["--rate", &FLOOD_RATE.to_string(), "--secs", &FLOOD_SECS.to_string()]);
        let (ns, sent) = run_worker("flood", &mut c)?;
        // Let the daemon drain what it has already received before reading its counters.
        std::thread::sleep(Duration::from_secs(1));
        let after = self.status_json()?;
        let counter = |v: &serde_json::Value, p: &str| {
            v.pointer(p)
                .and_then(|x| x.as_u64())
                .ok_or_else(|| anyhow!("bench: status JSON has no {p}"))
        };
        Ok(FloodResult {
            drops: counter(&after, "/kernel/ringbuf_drops")?
                .saturating_sub(counter(&before, "/kernel/ringbuf_drops")?),
            events: counter(&after, "/events_total")?
                .saturating_sub(counter(&before, "/events_total")?),
            sent,
            secs: ns as f64 / 1e9,
        })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Without,
    Monitor,
    Enforce,
}

/// Index of the "open()+close() watched secret" spec (its target is the secret path).
const SECRET_SPEC: usize = 2;

/// `file_decision_us` from the status: count (cumulative), and p50/p99/max of the last
/// 4096 permission events.
#[derive(Clone, Copy)]
pub(super) struct Decisions {
    pub(super) count: u64,
    pub(super) p50: u64,
    pub(super) p99: u64,
    pub(super) max: u64,
}

/// One enforce round: per-call medians (ns) and the decision latencies after each open run.
pub(super) struct EnforceRound {
    pub(super) connect_allowed: u64,
    pub(super) connect_denied: u64,
    pub(super) open_denied: u64,
    pub(super) open_allowed: u64,
    /// A plain file's open by a grant holder, same daemon.
    pub(super) open_plain: u64,
    pub(super) denied: Decisions,
    pub(super) allowed: Decisions,
    /// Denied opens while the issue 13 case 1 attacker runs.
    pub(super) open_attacked: u64,
    pub(super) attacked: Decisions,
}

pub(super) struct GrantRound {
    pub(super) issuance: grants::Issuance,
    /// `live_grants` after issuance.
    pub(super) live: u64,
    pub(super) loaded_ns: f64,
    pub(super) holder_ns: f64,
}

pub(super) struct FloodResult {
    pub(super) drops: u64,
    pub(super) events: u64,
    pub(super) sent: u64,
    pub(super) secs: f64,
}
