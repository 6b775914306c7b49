//! `cargo xtask bench`: overhead of the running daemon on the hooked syscalls, measured as
//! time-with-daemon / time-without over interleaved rounds (A = stopped, B = running), and
//! ring-buffer drops under a connect flood, and the Mint API: grant issuance latency and
//! throughput, and connect overhead with many live grants. A third daemon per round runs in
//! enforce mode: the same overhead loops (C vs A), then time from a violation to its denial:
//! connects outside a grant's intent (in-kernel, inside the syscall) and opens of a secret
//! (fanotify permission events: the daemon's decision latency from its status, and the open
//! call seen by the worker). Prints a table and writes target/bench.md.

mod alerts;
mod grants;
mod worker;

pub use worker::{Kind, WorkerArgs, worker};

use crate::{build, is_root, root, show};
use anyhow::{Context, Result, anyhow, bail};
use grants::{CLIENTS, GRANTS_PER_HOLDER, N_GRANTS, N_HOLDERS};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const PIN_DIR: &str = "/sys/fs/bpf/enforcer-bench";
const FLOOD_RATE: u64 = 100_000;
const FLOOD_SECS: f64 = 3.0;
/// Grant issuance targets.
const ISSUE_P99_MAX: Duration = Duration::from_millis(2);
const ISSUE_RATE_MIN: f64 = 2_000.0;
/// Enforce rounds: connects per worker for the per-call (denied / allowed) timings.
const VIOLATION_CONNECTS: u64 = 5_000;
/// Enforce rounds: opens of the secret per worker (denied without a grant, allowed with one).
const SECRET_OPENS: u64 = 20_000;
/// Fanotify permission-event decision latency target (p99, us).
const DECISION_P99_MAX_US: u64 = 200;
const EPERM: i32 = libc::EPERM;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("bench: interrupted");
    }
    Ok(())
}

/// One measured loop.
struct Spec {
    name: &'static str,
    kind: Kind,
    n: u64,
    target: String,
    /// Maximum ratio with/without, if this row has a target.
    limit: Option<f64>,
}

pub fn run(iterations: usize) -> Result<()> {
    if !is_root() {
        bail!(
            "bench: must run as root (creates a cgroup, loads kernel programs): run `sudo -E cargo xtask bench`"
        );
    }
    let iterations = iterations.max(1);
    let built = build::run(true)?;
    // Ctrl-C reaches the workers and the daemon too (same process group); we only note it and
    // unwind so the cleanup below runs. Handlers reset to default in exec'd children.
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let t0 = Instant::now();
    let mut bench = Bench::new(built.enforcer)?;
    let rows = bench.measure(iterations);
    bench.cleanup();
    let rows = rows?;
    let md = render(&rows, iterations);
    println!("\n{}", render_console(&rows));
    let out = root().join("target").join("bench.md");
    std::fs::write(&out, md).with_context(|| format!("bench: cannot write {}", out.display()))?;
    println!("bench: wrote {} ({:.0}s)", out.display(), t0.elapsed().as_secs_f64());
    Ok(())
}

struct Bench {
    enforcer: PathBuf,
    tmp: PathBuf,
    cgroup: PathBuf,
    cgroup_mount: PathBuf,
    /// Monitor mode (rounds B).
    config: PathBuf,
    /// Enforce mode, on_violation = "deny", destinations = the `tcp` listener only (rounds C).
    config_enforce: PathBuf,
    run_dir: PathBuf,
    daemon: Option<Child>,
    /// Grant holders (`sleep 3600`) of the current round; killed and reaped on every path.
    holders: Vec<Child>,
    starts: usize,
    tcp: SocketAddr,
    /// A second listener: outside the enforce config's intent.
    tcp_out: SocketAddr,
    udp: UdpSocket,
    specs: Vec<Spec>,
}

impl Bench {
    fn new(enforcer: PathBuf) -> Result<Self> {
        let cgroup_mount = cgroup2_mount()?;
        let id = std::process::id();
        // Leftovers of an earlier bench killed before it could clean up.
        remove_pins();
        if let Ok(entries) = std::fs::read_dir(&cgroup_mount) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("enforcer-bench-") {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let tmp = std::env::temp_dir().join(format!("enforcer-bench-{id}"));
        let cgroup = cgroup_mount.join(format!("enforcer-bench-{id}"));
        let run_dir = tmp.join("run");
        let config = tmp.join("enforcer.toml");
        let config_enforce = tmp.join("enforcer-enforce.toml");
        // Listeners first: nothing to clean up if they fail.
        let tcp = tcp_listener()?;
        let tcp_out = tcp_listener()?;
        let udp = UdpSocket::bind("127.0.0.1:0").context("bench: cannot bind a UDP socket")?;
        let mut b = Bench {
            enforcer,
            tmp,
            cgroup,
            cgroup_mount,
            config,
            config_enforce,
            run_dir,
            daemon: None,
            holders: Vec::new(),
            starts: 0,
            tcp,
            tcp_out,
            udp,
            specs: Vec::new(),
        };
        b.prepare().inspect_err(|_| b.cleanup())?;
        Ok(b)
    }

    fn prepare(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.tmp)
            .with_context(|| format!("bench: cannot create {}", self.tmp.display()))?;
        std::fs::create_dir(&self.cgroup)
            .with_context(|| format!("bench: cannot create cgroup {}", self.cgroup.display()))?;
        let plain = self.tmp.join("plain.txt");
        let secret = self.tmp.join("secret.txt");
        std::fs::write(&plain, "not a secret\n")?;
        std::fs::write(&secret, "bench-secret-value\n")?;
        let q = |p: &Path| {
            format!("\"{}\"", p.display().to_string().replace('\\', "\\\\").replace('"', "\\\""))
        };
        // Top-level keys before the first table; no mint rate limit (the bench issues grants
        // as fast as the daemon answers).
        let config = |mode: &str, destination: &str, extra: &str| {
            format!(
                "mode = \"{mode}\"\ncgroup_root = {}\nruntime_dir = {}\nstate_dir = {}\npin_dir = {}\n\
                 mint_rate_per_second = 0\n\n\
                 [[secret]]\nname = \"bench-secret\"\npaths = [{}]\n\n\
                 [[intent]]\nname = \"{}\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"bench-secret\"]\n\
                 destinations = [\"{destination}\"]\nmax_ttl = \"1h\"\n{extra}",
                q(&self.cgroup),
                q(&self.run_dir),
                q(&self.tmp.join("state")),
                q(Path::new(PIN_DIR)),
                q(&secret),
                grants::INTENT,
            )
        };
        std::fs::write(&self.config, config("monitor", "127.0.0.1/32:1-65535", ""))?;
        // Enforce: only the `tcp` listener is inside the intent; `tcp_out` is a violation, and
        // an open of the secret without a grant is one too (denied: the intent covering the
        // secret says deny).
        std::fs::write(
            &self.config_enforce,
            config(
                "enforce",
                &format!("127.0.0.1/32:{}", self.tcp.port()),
                "on_violation = \"deny\"\n",
            ),
        )?;
        let s = |p: &Path| p.display().to_string();
        self.specs = vec![
            Spec {
                name: "connect() loopback TCP",
                kind: Kind::Connect,
                n: 20_000,
                target: self.tcp.to_string(),
                limit: Some(1.05),
            },
            Spec {
                name: "open()+close() non-secret",
                kind: Kind::Open,
                n: 50_000,
                target: s(&plain),
                limit: Some(1.05),
            },
            Spec {
                name: "open()+close() watched secret",
                kind: Kind::Open,
                n: 20_000,
                target: s(&secret),
                limit: None,
            },
            Spec {
                name: "fork+exec /bin/true",
                kind: Kind::Exec,
                n: 1_000,
                target: "/bin/true".into(),
                limit: Some(1.10),
            },
        ];
        Ok(())
    }

    /// Rounds of A (no daemon), B (monitor mode, with the grant round, and the drop test in
    /// the last one) and C (enforce mode: overhead loops, then violation-to-denial timings),
    /// in an order that rotates per round.
    fn measure(&mut self, iterations: usize) -> Result<Vec<Row>> {
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
            for kind in [alerts::SinkKind::File, alerts::SinkKind::Hec] {
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
                alert_rounds.push(r);
            }
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
        Ok(EnforceRound {
            connect_allowed,
            connect_denied,
            open_denied,
            open_allowed,
            denied,
            allowed,
        })
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
    fn grant_round(&mut self) -> Result<GrantRound> {
        let t0 = Instant::now();
        grants::spawn_holders(N_HOLDERS, &self.cgroup, &mut self.holders, check_interrupted)?;
        println!(
            "bench: grants: {N_HOLDERS} holders started in {:.2}s",
            t0.elapsed().as_secs_f64()
        );
        let pids: Vec<u32> = self.holders.iter().map(Child::id).collect();
        let sock = self.mint_sock();
        println!(
            "bench: grants: issuing {N_GRANTS} ({GRANTS_PER_HOLDER} per holder) from {CLIENTS} keep-alive clients"
        );
        let issuance = grants::issue_all(&sock, &pids, GRANTS_PER_HOLDER)?;
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

    fn mint_sock(&self) -> PathBuf {
        self.run_dir.join("mint.sock")
    }

    /// Kill and reap the holders; with the daemon running, wait (bounded) until it has ended
    /// their grants, so the next measurement does not overlap that work.
    fn release_holders(&mut self) {
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

    /// A worker that stops before its loop; with `grant`, a grant of the bench intent is bound
    /// to it meanwhile. With `expect_errno`, every call must fail with it; calls are timed
    /// one by one (`--per-op`) when they may be denied or `n` is one of the per-call counts.
    fn bound_worker(
        &self,
        name: &str,
        kind: &str,
        target: &str,
        n: u64,
        grant: bool,
        expect_errno: Option<i32>,
    ) -> Result<WorkerOut> {
        let mut c = self.worker_cmd()?;
        c.arg("bench-worker")
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(["--kind", kind, "--target", target, "--n", &n.to_string(), "--wait-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if expect_errno.is_some() || n == VIOLATION_CONNECTS || n == SECRET_OPENS {
            c.arg("--per-op");
        }
        if let Some(e) = expect_errno {
            c.args(["--expect-errno", &e.to_string()]);
        }
        let mut child =
            c.spawn().with_context(|| format!("bench: cannot start worker `{}`", show(&c)))?;
        let mut run = || -> Result<WorkerOut> {
            let mut out = BufReader::new(child.stdout.take().expect("piped"));
            let mut line = String::new();
            out.read_line(&mut line)?;
            let pid: u32 =
                line.trim().strip_prefix("pid=").and_then(|p| p.parse().ok()).ok_or_else(|| {
                    anyhow!("bench: {name}: worker printed {line:?} instead of its pid")
                })?;
            if grant {
                let id =
                    grants::Client::connect(&self.mint_sock())?.issue(pid).with_context(|| {
                        format!("bench: {name}: cannot bind a grant to the worker (pid {pid})")
                    })?;
                println!("bench: grants: {name}: worker {pid} holds grant {id}");
            }
            // Dropping stdin after the line: the worker never waits on it again.
            child.stdin.take().expect("piped").write_all(b"go\n")?;
            let mut text = String::new();
            out.read_to_string(&mut text)?;
            let status = child.wait()?;
            check_interrupted()?;
            if !status.success() {
                bail!("bench: {name}: worker failed ({status}): `{}`", show(&c));
            }
            let (ns, ops) = parse_worker(name, &text)?;
            let p50 = text
                .split_whitespace()
                .find_map(|w| w.strip_prefix("p50="))
                .and_then(|v| v.parse().ok());
            Ok(WorkerOut { name: name.to_string(), ns, ops, p50 })
        };
        let r = run();
        if r.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        r
    }

    /// The bench worker command; the child joins the bench cgroup before exec (and the worker
    /// joins it again itself, a no-op then).
    fn worker_cmd(&self) -> Result<Command> {
        let mut c = Command::new(std::env::current_exe()?);
        grants::join_before_exec(
            &mut c,
            std::ffi::CString::new(
                self.cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes(),
            )?,
        );
        Ok(c)
    }

    /// Run spec `i` in a worker process inside the bench cgroup: (elapsed ns, ops).
    fn worker(&self, i: usize, n: Option<u64>) -> Result<(u128, u64)> {
        let s = &self.specs[i];
        let mut c = self.worker_cmd()?;
        c.arg("bench-worker")
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(["--kind", &format!("{:?}", s.kind).to_lowercase(), "--target", &s.target])
            .args(["--n", &n.unwrap_or(s.n).to_string()]);
        run_worker(s.name, &mut c)
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

    fn status_json(&self) -> Result<serde_json::Value> {
        let mut c = Command::new(&self.enforcer);
        c.args(["status", "--json", "--runtime-dir"]).arg(&self.run_dir);
        let out = c.output().with_context(|| format!("bench: cannot run `{}`", show(&c)))?;
        if !out.status.success() {
            bail!(
                "bench: `{}` failed ({}): {}",
                show(&c),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("bench: `{}` printed no JSON", show(&c)))
    }

    /// Starts the daemon with the monitor config, or with `enforce` the enforce config.
    fn start_daemon(&mut self, enforce: bool) -> Result<()> {
        let config = if enforce { self.config_enforce.clone() } else { self.config.clone() };
        self.start_daemon_with(&config)
    }

    fn start_daemon_with(&mut self, config: &Path) -> Result<()> {
        self.starts += 1;
        let log_path = self.tmp.join(format!("daemon-{}.log", self.starts));
        let log = std::fs::File::create(&log_path)?;
        let mut c = Command::new(&self.enforcer);
        c.arg("daemon")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        println!("$ {}  (log: {})", show(&c), log_path.display());
        self.daemon =
            Some(c.spawn().with_context(|| format!("bench: cannot start `{}`", show(&c)))?);
        let t0 = Instant::now();
        loop {
            check_interrupted()?;
            if let Some(st) = self.daemon.as_mut().and_then(|d| d.try_wait().ok().flatten()) {
                self.daemon = None;
                bail!(
                    "bench: daemon exited during startup ({st}); log {}:\n{}",
                    log_path.display(),
                    tail(&log_path)
                );
            }
            let ready = Command::new(&self.enforcer)
                .args(["status", "--runtime-dir"])
                .arg(&self.run_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!(
                    "bench: daemon not ready after 30 s; log {}:\n{}",
                    log_path.display(),
                    tail(&log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("bench: daemon ready in {:.2}s", t0.elapsed().as_secs_f64());
        // Startup work after readiness (e.g. a /proc scan) must not land in the measurement.
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    /// SIGTERM and wait (SIGKILL after 15 s); then remove the pins so programs are detached.
    fn stop_daemon(&mut self) -> Result<()> {
        let Some(mut d) = self.daemon.take() else { return Ok(()) };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.id() as libc::pid_t, libc::SIGTERM) };
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = d.try_wait()? {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(15) {
                let _ = d.kill();
                let _ = d.wait();
                remove_pins();
                bail!("bench: daemon ignored SIGTERM for 15 s (killed)");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        remove_pins();
        if !status.success() {
            println!("bench: warning: daemon exited with {status} after SIGTERM");
        }
        // The log goes away with the temporary directory: show its warnings and errors now.
        let log_path = self.tmp.join(format!("daemon-{}.log", self.starts));
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let bad: Vec<&str> =
            log.lines().filter(|l| l.contains("ERROR") || l.contains("WARN")).collect();
        if !bad.is_empty() {
            println!(
                "bench: warning: {} WARN/ERROR lines in {}; first ones:",
                bad.len(),
                log_path.display()
            );
            for l in bad.iter().take(5) {
                println!("bench:   {l}");
            }
        }
        Ok(())
    }

    /// Stop the daemon, remove pins, cgroup and temporary files. Safe to call twice.
    fn cleanup(&mut self) {
        grants::kill_all(&mut self.holders);
        if let Err(e) = self.stop_daemon() {
            eprintln!("bench: cleanup: {e:#}");
        }
        remove_pins();
        if self.cgroup.exists() {
            // Anything left inside (a worker killed mid-loop) goes back to the root cgroup.
            if let Ok(pids) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
                for pid in pids.lines() {
                    let _ = std::fs::write(self.cgroup_mount.join("cgroup.procs"), pid);
                }
            }
            let mut ok = false;
            for _ in 0..50 {
                if std::fs::remove_dir(&self.cgroup).is_ok() {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !ok {
                eprintln!("bench: cleanup: cannot remove cgroup {}", self.cgroup.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.cleanup();
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

struct WorkerOut {
    name: String,
    ns: u128,
    ops: u64,
    /// Median ns of one call (`--per-op`).
    p50: Option<u64>,
}

impl WorkerOut {
    fn p50(&self) -> Result<u64> {
        self.p50.ok_or_else(|| anyhow!("bench: {}: worker printed no p50", self.name))
    }
}

/// `file_decision_us` from the status: count (cumulative), and p50/p99/max of the last
/// 4096 permission events.
#[derive(Clone, Copy)]
struct Decisions {
    count: u64,
    p50: u64,
    p99: u64,
    max: u64,
}

/// One enforce round: per-call medians (ns) and the decision latencies after each open run.
struct EnforceRound {
    connect_allowed: u64,
    connect_denied: u64,
    open_denied: u64,
    open_allowed: u64,
    denied: Decisions,
    allowed: Decisions,
}

/// Rows of the enforce rounds: violation-to-denial for connects (in-kernel) and secret opens
/// The rounds that succeeded, and a failing row naming the first error when any did not.
fn split_rounds<'a, T>(rounds: &'a [Result<T>], what: &str) -> (Vec<&'a T>, Vec<Row>) {
    let errors: Vec<String> =
        rounds.iter().filter_map(|r| r.as_ref().err()).map(|e| format!("{e:#}")).collect();
    let ok = rounds.iter().filter_map(|r| r.as_ref().ok()).collect();
    let mut rows = Vec::new();
    if let Some(e) = errors.first() {
        rows.push(Row {
            name: format!("{what} rounds ({} of {} failed)", errors.len(), rounds.len()),
            without: "-".into(),
            with: format!("error: {e}"),
            ratio: "-".into(),
            target: "no error".into(),
            pass: Some(false),
        });
    }
    (ok, rows)
}

/// (fanotify decision latency, and the open call as the worker sees it); medians of rounds,
/// against the per-call medians without the daemon.
fn enforce_rows(
    rounds: &[Result<EnforceRound>],
    base_connect: &[u64],
    base_open: &[u64],
) -> Vec<Row> {
    let (ok, mut rows) = split_rounds(rounds, "enforce");
    if ok.is_empty() {
        return rows;
    }
    let med = |v: Vec<u64>| median(&v.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let (bc, bo) = (med(base_connect.to_vec()), med(base_open.to_vec()));
    let per_call = |name: String, b: f64, w: f64, target: &str, pass: Option<bool>| Row {
        name,
        without: format!("{:.2} us", b / 1e3),
        with: format!("{:.2} us", w / 1e3),
        ratio: format!("{:.3}", w / b),
        target: target.into(),
        pass,
    };
    let ca = med(ok.iter().map(|e| e.connect_allowed).collect());
    let cd = med(ok.iter().map(|e| e.connect_denied).collect());
    rows.push(per_call(
        format!("connect() per call by a grant holder, inside its intent, enforce mode (median of N={VIOLATION_CONNECTS})"),
        bc,
        ca,
        "-",
        None,
    ));
    rows.push(per_call(
        format!(
            "time to denial, connect() outside the grant's intent, on_violation deny: EPERM from the call itself \
             (in-kernel, synchronous; median of N={VIOLATION_CONNECTS}, all EPERM)"
        ),
        bc,
        cd,
        "EPERM inside the syscall (0 beyond it)",
        Some(true),
    ));
    let od = med(ok.iter().map(|e| e.open_denied).collect());
    let oa = med(ok.iter().map(|e| e.open_allowed).collect());
    rows.push(per_call(
        format!("time to denial, open() of the secret without a grant, on_violation deny (fanotify; median of N={SECRET_OPENS}, all EPERM)"),
        bo,
        od,
        "EPERM",
        Some(true),
    ));
    rows.push(per_call(
        format!("open()+close() of the secret by a grant holder, enforce mode, allowed (fanotify; median of N={SECRET_OPENS})"),
        bo,
        oa,
        "-",
        None,
    ));
    // `max` is the daemon's lifetime maximum: after the allowed opens it covers the denied
    // ones too.
    let decision_row = |what: &str, max_what: &str, d: Vec<Decisions>| {
        let p99s: Vec<u64> = d.iter().map(|x| x.p99).collect();
        let p99 = med(p99s.clone());
        Row {
            name: format!(
                "fanotify decision latency (file_decision_us: event read to answer, last 4096 of N={SECRET_OPENS}), {what}; \
                 median of rounds"
            ),
            without: "-".into(),
            with: format!(
                "p50 {:.0} us, p99 {p99:.0} us (rounds {p99s:?}), max {} us {max_what}",
                med(d.iter().map(|x| x.p50).collect()),
                d.iter().map(|x| x.max).max().unwrap_or(0)
            ),
            ratio: "-".into(),
            target: format!("p99 <= {DECISION_P99_MAX_US} us"),
            pass: Some(p99 <= DECISION_P99_MAX_US as f64),
        }
    };
    rows.push(decision_row(
        "denied opens (no grant)",
        "(any round)",
        ok.iter().map(|e| e.denied).collect(),
    ));
    rows.push(decision_row(
        "allowed opens (grant holder)",
        "(any round, denied and allowed opens)",
        ok.iter().map(|e| e.allowed).collect(),
    ));
    rows
}

struct GrantRound {
    issuance: grants::Issuance,
    /// `live_grants` after issuance.
    live: u64,
    loaded_ns: f64,
    holder_ns: f64,
}

/// Rows of the grant rounds: issuance latency (all rounds' requests pooled), throughput (median
/// of rounds), connect with N_GRANTS live grants and connect by a grant holder (vs the same
/// loops in the rounds without the daemon).
fn grant_rows(
    rounds: &[Result<GrantRound>],
    loaded: &[Vec<f64>; 2],
    holder: &[Vec<f64>; 2],
    n: u64,
) -> Vec<Row> {
    let (ok, mut rows) = split_rounds(rounds, "grant");
    if ok.is_empty() {
        return rows;
    }
    let mut lat: Vec<u64> = ok.iter().flat_map(|g| g.issuance.latencies.iter().copied()).collect();
    lat.sort_unstable();
    let failures: usize = ok.iter().map(|g| g.issuance.failures).sum();
    let requests = lat.len();
    let p99 = grants::quantile(&lat, 0.99);
    let rate = median(
        &ok.iter()
            .map(|g| g.issuance.latencies.len() as f64 / g.issuance.wall.as_secs_f64())
            .collect::<Vec<_>>(),
    );
    rows.push(Row {
        name: format!(
            "grant issuance latency, POST /v1/grants ({N_GRANTS} per round on {N_HOLDERS} holders, {CLIENTS} keep-alive clients; {} rounds pooled)",
            ok.len()
        ),
        without: "-".into(),
        with: format!("p50 {}, p99 {}, max {}", grants::fmt_ns(grants::quantile(&lat, 0.5)), grants::fmt_ns(p99), grants::fmt_ns(lat.last().copied().unwrap_or(0))),
        ratio: "-".into(),
        target: format!("p99 <= {} ms, all 201", ISSUE_P99_MAX.as_millis()),
        pass: Some(p99 as u128 <= ISSUE_P99_MAX.as_nanos() && failures == 0),
    });
    rows.push(Row {
        name: format!(
            "grant issuance throughput ({N_GRANTS} grants / wall time, median of rounds)"
        ),
        without: "-".into(),
        with: format!("{rate:.0} grants/s; {failures} of {requests} requests failed"),
        ratio: "-".into(),
        target: format!(">= {ISSUE_RATE_MIN:.0}/s, 0 failures"),
        pass: Some(rate >= ISSUE_RATE_MIN && failures == 0),
    });
    let compare =
        |a: &[f64], b: &[f64]| (!a.is_empty() && !b.is_empty()).then(|| (median(a), median(b)));
    let lives: Vec<u64> = ok.iter().map(|g| g.live).collect();
    let all_live = lives.iter().all(|&l| l == N_GRANTS as u64);
    if let Some((a, b)) = compare(&loaded[0], &loaded[1]) {
        let ratio = b / a;
        rows.push(Row {
            name: format!(
                "connect() loopback TCP, {N_GRANTS} live grants, worker holds none (N={n})"
            ),
            without: format!("{:.2} us", a / 1e3),
            with: if all_live {
                format!("{:.2} us", b / 1e3)
            } else {
                format!("{:.2} us (live_grants {lives:?})", b / 1e3)
            },
            ratio: format!("{ratio:.3}"),
            target: format!("<= 1.05, live_grants = {N_GRANTS}"),
            pass: Some(ratio <= 1.05 && all_live),
        });
    }
    if let Some((a, b)) = compare(&holder[0], &holder[1]) {
        rows.push(Row {
            name: format!("connect by a grant holder (kernel verdict per connect), {N_GRANTS} other grants live (N={n})"),
            without: format!("{:.2} us", a / 1e3),
            with: format!("{:.2} us", b / 1e3),
            ratio: format!("{:.3}", b / a),
            target: "-".into(),
            pass: None,
        });
    }
    rows
}

struct FloodResult {
    drops: u64,
    events: u64,
    sent: u64,
    secs: f64,
}

fn run_worker(name: &str, c: &mut Command) -> Result<(u128, u64)> {
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("bench: cannot start worker `{}`", show(c)))?;
    check_interrupted()?;
    if !out.status.success() {
        bail!("bench: {name}: worker failed ({}): `{}`", out.status, show(c));
    }
    parse_worker(name, &String::from_utf8_lossy(&out.stdout))
}

/// The worker's `ns=<elapsed> ops=<count>` line.
fn parse_worker(name: &str, text: &str) -> Result<(u128, u64)> {
    let field = |k: &str| {
        text.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse::<u128>().ok())
    };
    match (field("ns="), field("ops=")) {
        (Some(ns), Some(ops)) => Ok((ns, ops as u64)),
        _ => bail!("bench: {name}: worker printed {text:?}"),
    }
}

/// A loopback TCP listener that accepts and drops connections on its own thread.
fn tcp_listener() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bench: cannot bind a TCP listener")?;
    // Deeper accept queue than std's 128, so the connect loop never waits on the acceptor.
    // SAFETY: re-listening on a listening socket only resizes its backlog.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    Ok(addr)
}

fn remove_pins() {
    if let Err(e) = std::fs::remove_dir_all(PIN_DIR)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("bench: cannot remove {PIN_DIR}: {e}");
    }
}

/// The cgroup2 mount point from /proc/mounts.
fn cgroup2_mount() -> Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/mounts").context("bench: cannot read /proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1].replace("\\040", " ")))
        .context("bench: no cgroup2 mount in /proc/mounts")
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) { (v[m - 1] + v[m]) / 2.0 } else { v[m] }
}

struct Row {
    name: String,
    without: String,
    with: String,
    ratio: String,
    target: String,
    pass: Option<bool>,
}

impl Row {
    fn cells(&self) -> [String; 6] {
        let verdict = match self.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "info",
        };
        [&self.name, &self.without, &self.with, &self.ratio, &self.target, verdict]
            .map(|s| s.to_string())
    }
}

const HEADER: [&str; 6] =
    ["measurement", "median without", "median with", "ratio", "target", "result"];

fn render_console(rows: &[Row]) -> String {
    let cells: Vec<_> = rows.iter().map(Row::cells).collect();
    let width =
        |i: usize| cells.iter().map(|c| c[i].len()).chain([HEADER[i].len()]).max().unwrap_or(0);
    let widths: Vec<_> = (0..6).map(width).collect();
    let line = |c: &[String]| {
        c.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect::<Vec<_>>().join("  ")
    };
    let mut out = line(&HEADER.map(String::from));
    for c in &cells {
        out += "\n";
        out += line(c).trim_end();
    }
    out
}

fn render(rows: &[Row], iterations: usize) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let mut md = format!(
        "# enforcer bench\n\nKernel {}, {} cores, load average at the end {load}; {iterations} interleaved rounds (order rotating per round) without the \
         daemon, with it in monitor mode and with it in enforce mode (rows marked so; on_violation deny, the intent's destinations \
         only the bench listener); per-operation medians. Time-to-denial rows: per-call medians of calls timed one \
         by one (without = the same calls without the daemon); decision latency is the daemon's own \
         `file_decision_us` from `enforcer status --json`. Grant rows: each round with the daemon also starts \
         {N_HOLDERS} `sleep` holders and issues {N_GRANTS} grants to them ({GRANTS_PER_HOLDER} each) over the \
         Mint API from {CLIENTS} threads, one keep-alive connection each; the connect rows after it run \
         with those grants live.\n\n| {} |\n|{}\n",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        HEADER.join(" | "),
        "---|".repeat(HEADER.len()),
    );
    for r in rows {
        md += &format!("| {} |\n", r.cells().join(" | "));
    }
    md
}
