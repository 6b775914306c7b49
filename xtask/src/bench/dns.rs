//! DNS stub rows (issue 15 "Benchmark"): the latency a granted process's DNS query gains by
//! being steered through the daemon's stub, and connect() to an address learned by name with
//! 10,000 learned addresses loaded. A tiny UDP DNS responder runs in the bench itself on
//! `127.0.0.153:53` (loopback only, never any other network): it answers every A query, so the
//! same query goes straight to it without the daemon, and through the stub (steered by the
//! kernel: port 53 of a grant holder) with it. Rounds alternate without / with, in a rotating
//! order, like the other rows. `cargo xtask bench --only dns` runs just these rows.

use super::harness::{Bench, parse_worker};
use super::report::{Row, median};
use super::{WorkerArgs, bpf_stats, check_interrupted, grants};
use crate::show;
use anyhow::{Context, Result, anyhow, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The responder's address: port 53, so a grant holder's query to it is steered to the stub.
const RESPONDER: &str = "127.0.0.153:53";
/// Queries timed one by one per worker (a new UDP socket each, as glibc's resolver does).
const QUERIES: u64 = 3_000;
/// Names resolved (and so learned for the worker's grant) before the connect loop.
pub(super) const LEARN: u64 = 10_000;
/// Connects timed after the learning.
const CONNECTS: u64 = 20_000;
/// Target: added p99 latency per query through the stub.
const ADDED_P99_MAX: Duration = Duration::from_millis(1);
/// Target: connect() ratio with the learned addresses loaded.
const CONNECT_LIMIT: f64 = 1.05;
/// The name the latency loop asks; the connect target's name (answered 127.0.0.1).
const LATENCY_NAME: &str = "lat.bench.test";
const TCP_NAME: &str = "tcp.bench.test";
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The bench's DNS responder thread; stopped on drop.
pub(super) struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the responder: `h<i>.bench.test` is answered 127.2.(i / 256).(i % 256), every other
/// name 127.0.0.1 (where the bench's TCP listener is); TTL 3600 s.
pub(super) fn responder() -> Result<Responder> {
    let sock = UdpSocket::bind(RESPONDER)
        .with_context(|| format!("bench: dns: cannot bind the responder on {RESPONDER}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !flag.load(Ordering::SeqCst) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
            if let Some(reply) = answer(&buf[..n]) {
                let _ = sock.send_to(&reply, from);
            }
        }
    });
    Ok(Responder { stop, thread: Some(thread) })
}

/// The reply to one A query (None: not a well-formed single-question query).
fn answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let (name, end) = read_name(q, 12)?;
    let qend = end + 4;
    if q.len() < qend {
        return None;
    }
    let ip = name
        .strip_suffix(".bench.test")
        .and_then(|h| h.strip_prefix('h'))
        .and_then(|i| i.parse::<u32>().ok())
        .map_or(Ipv4Addr::LOCALHOST, |i| Ipv4Addr::new(127, 2, (i / 256) as u8, (i % 256) as u8));
    let mut r = Vec::with_capacity(qend + 16);
    r.extend_from_slice(&q[..2]);
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    r.extend_from_slice(&q[12..qend]);
    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    r.extend_from_slice(&3600u32.to_be_bytes());
    r.extend_from_slice(&[0, 4]);
    r.extend_from_slice(&ip.octets());
    Some(r)
}

/// An uncompressed name at `o`: (dotted, lower case; offset after it).
fn read_name(d: &[u8], mut o: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    loop {
        let n = *d.get(o)? as usize;
        if n == 0 {
            return Some((labels.join("."), o + 1));
        }
        if n & 0xc0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(d.get(o + 1..o + 1 + n)?).to_ascii_lowercase());
        o += 1 + n;
    }
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.') {
        p.push(l.len() as u8);
        p.extend_from_slice(l.as_bytes());
    }
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    p
}

/// One query on `s` (connected): the first A answer.
fn ask(s: &UdpSocket, id: u16, name: &str) -> Result<Ipv4Addr> {
    s.send(&query(id, name)).with_context(|| format!("bench worker: dns: send {name}"))?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).with_context(|| format!("bench worker: dns: no answer for {name}"))?;
    let d = &buf[..n];
    if n < 12 || u16::from_be_bytes([d[0], d[1]]) != id {
        bail!("bench worker: dns: {name}: reply of {n} bytes with another id");
    }
    if d[3] & 0x0f != 0 || u16::from_be_bytes([d[6], d[7]]) == 0 {
        bail!("bench worker: dns: {name}: rcode {} with {} answers", d[3] & 0x0f, d[7]);
    }
    first_a(d).ok_or_else(|| anyhow!("bench worker: dns: {name}: no A record in the reply"))
}

/// The first A record of the answer section.
fn first_a(d: &[u8]) -> Option<Ipv4Addr> {
    let skip = |mut o: usize| -> Option<usize> {
        loop {
            let n = *d.get(o)? as usize;
            if n == 0 {
                return Some(o + 1);
            }
            if n & 0xc0 == 0xc0 {
                return Some(o + 2);
            }
            o += 1 + n;
        }
    };
    let mut o = skip(12)? + 4;
    for _ in 0..u16::from_be_bytes([d[6], d[7]]) {
        o = skip(o)?;
        let rr = d.get(o..o + 10)?;
        let len = u16::from_be_bytes([rr[8], rr[9]]) as usize;
        let data = d.get(o + 10..o + 10 + len)?;
        if rr[..2] == [0, 1] && len == 4 {
            return Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        o += 10 + len;
    }
    None
}

fn socket_to(server: SocketAddr) -> Result<UdpSocket> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
    s.connect(server).with_context(|| format!("bench worker: dns: connect to {server}"))?;
    Ok(s)
}

/// Worker `dns`: `n` lookups of one name, each on a new UDP socket (socket, connect, send,
/// receive, close), timed one by one into `samples`.
pub fn query_loop(a: &WorkerArgs, samples: &mut Vec<u64>) -> Result<u64> {
    let server: SocketAddr = a.target.parse().context("bench worker: dns: bad address")?;
    for i in 0..a.n {
        let t = Instant::now();
        let ip = ask(&socket_to(server)?, i as u16, LATENCY_NAME)?;
        samples.push(t.elapsed().as_nanos() as u64);
        if ip != Ipv4Addr::LOCALHOST {
            bail!("bench worker: dns: {LATENCY_NAME} answered {ip}");
        }
    }
    Ok(a.n)
}

/// Worker `dns-connect`, before its connect loop: resolves `--learn` distinct names and the
/// connect target's name through `--dns` (with a grant, each answer is learned for it).
pub fn learn(a: &WorkerArgs) -> Result<()> {
    let server: SocketAddr = a
        .dns
        .as_deref()
        .ok_or_else(|| anyhow!("bench worker: dns-connect needs --dns"))?
        .parse()
        .context("bench worker: dns: bad --dns address")?;
    let s = socket_to(server)?;
    for i in 0..a.learn {
        ask(&s, i as u16, &format!("h{i}.bench.test"))?;
    }
    let ip = ask(&s, 0, TCP_NAME)?;
    if ip != Ipv4Addr::LOCALHOST {
        bail!("bench worker: dns: {TCP_NAME} answered {ip}");
    }
    Ok(())
}

/// One worker's figures.
struct Timing {
    ns_per_op: f64,
    p50: u64,
    p99: u64,
    /// With the daemon: the connect loop's kernel cost (bpf_stats) and the daemon's CPU.
    costs: Option<String>,
}

impl Bench {
    /// The enforce-mode config of the DNS rows: the stub's upstream is the responder; the
    /// intent names hosts only (no networks), so every allowed connect is a learned address.
    fn dns_config(&self) -> Result<std::path::PathBuf> {
        let q = |p: &Path| format!("\"{}\"", p.display());
        let path = self.tmp.join("enforcer-dns.toml");
        std::fs::write(
            &path,
            format!(
                "mode = \"enforce\"\ncgroup_root = {}\nruntime_dir = {}\nstate_dir = {}\npin_dir = {}\n\
                 mint_rate_per_second = 0\n\n[dns]\nupstream = [\"{RESPONDER}\"]\nmin_ttl = \"10m\"\n\n\
                 [[intent]]\nname = \"{}\"\nagents = [{{ uid = 0 }}]\n\
                 destinations = [\"*.bench.test:{}\"]\nmax_ttl = \"1h\"\non_violation = \"deny\"\n",
                q(&self.cgroup),
                q(&self.run_dir),
                q(&self.tmp.join("state")),
                q(Path::new(super::PIN_DIR)),
                grants::INTENT,
                self.tcp.port(),
            ),
        )?;
        Ok(path)
    }

    /// A worker in the bench cgroup; with `grant`, a grant of the bench intent is bound to
    /// it before its loop.
    fn dns_worker(&self, kind: &str, extra: &[&str], grant: bool) -> Result<Timing> {
        let mut c = self.worker_cmd()?;
        c.arg("bench-worker")
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(["--kind", kind, "--wait-stdin"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child =
            c.spawn().with_context(|| format!("bench: cannot start worker `{}`", show(&c)))?;
        let mut run = || -> Result<Timing> {
            let mut out = BufReader::new(child.stdout.take().expect("piped"));
            let mut line = String::new();
            out.read_line(&mut line)?;
            let pid: u32 =
                line.trim().strip_prefix("pid=").and_then(|p| p.parse().ok()).ok_or_else(|| {
                    anyhow!("bench: dns: worker printed {line:?} instead of its pid")
                })?;
            if grant {
                grants::Client::connect(&self.mint_sock())?
                    .issue(pid)
                    .with_context(|| format!("bench: dns: cannot bind a grant to worker {pid}"))?;
            }
            child.stdin.take().expect("piped").write_all(b"go\n")?;
            // The connect loop's kernel cost (program ns per run, daemon CPU), with the daemon.
            // Opt-in (ENFORCER_BENCH_BPF_STATS=1): the kernel's accounting adds two clock
            // reads to every program run, so it is off for the timed ratios.
            let stats = (kind == "dns-connect").then(|| {
                let mut l = String::new();
                let _ = out.read_line(&mut l);
                let pid =
                    self.daemon.as_ref().map(|d| d.id()).filter(|_| {
                        std::env::var("ENFORCER_BENCH_BPF_STATS").is_ok_and(|v| v == "1")
                    });
                (pid.map(|_| bpf_stats::Enabled::on()), pid.map(bpf_stats::snapshot), pid)
            });
            let mut text = String::new();
            out.read_to_string(&mut text)?;
            let costs = match stats {
                Some((_on, Some(a), Some(pid))) => {
                    Some(bpf_stats::report(&a, &bpf_stats::snapshot(pid), CONNECTS))
                }
                _ => None,
            };
            let status = child.wait()?;
            check_interrupted()?;
            if !status.success() {
                bail!("bench: dns: worker failed ({status}): `{}`", show(&c));
            }
            let (ns, ops) = parse_worker(kind, &text)?;
            let field = |k: &str| {
                text.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok())
            };
            Ok(Timing {
                ns_per_op: ns as f64 / ops.max(1) as f64,
                p50: field("p50=").unwrap_or(0),
                p99: field("p99=").unwrap_or(0),
                costs,
            })
        };
        let r = run();
        if r.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        r
    }

    /// The three workers of one phase: (query latency, a grant holder's connects after
    /// learning, then the same connects by a process nobody judges, the learned addresses
    /// still loaded).
    fn dns_phase(&self, with: bool) -> Result<(Timing, Timing, Timing)> {
        let n = QUERIES.to_string();
        let lat = self.dns_worker("dns", &["--per-op", "--target", RESPONDER, "--n", &n], with)?;
        let (tcp, learn, n) = (self.tcp.to_string(), LEARN.to_string(), CONNECTS.to_string());
        let conn = |learn: &str, grant: bool| {
            self.dns_worker(
                "dns-connect",
                &["--per-op", "--target", &tcp, "--dns", RESPONDER, "--learn", learn, "--n", &n],
                grant,
            )
        };
        let held = conn(&learn, with)?;
        let plain = conn("0", false)?;
        Ok((lat, held, plain))
    }

    /// The DNS rows: `iterations` rounds of without / with the daemon (enforce mode, the
    /// stub's upstream being the responder), order alternating per round.
    pub(super) fn dns_rows(&mut self, iterations: usize) -> Result<Vec<Row>> {
        let config = self.dns_config()?;
        let _responder = responder()?;
        let t0 = Instant::now();
        // [without, with]: per round.
        let mut p50 = [Vec::new(), Vec::new()];
        let mut p99 = [Vec::new(), Vec::new()];
        // Per round: the connect loop's mean and its median call.
        let mut conn = [Vec::new(), Vec::new()];
        let mut conn_p50 = [Vec::new(), Vec::new()];
        let mut plain_p50 = [Vec::new(), Vec::new()];
        let mut learned = Vec::new();
        for round in 0..iterations {
            let order = if round % 2 == 0 { [false, true] } else { [true, false] };
            for with in order {
                if with {
                    self.start_daemon_with(&config)?;
                }
                let r = self.dns_phase(with);
                if with {
                    let st = self.status_json();
                    self.stop_daemon()?;
                    if let Ok(st) = st {
                        learned.push(st["dns"].clone());
                    }
                }
                let (lat, c, plain) = r?;
                let i = with as usize;
                p50[i].push(lat.p50 as f64);
                p99[i].push(lat.p99 as f64);
                conn[i].push(c.ns_per_op);
                conn_p50[i].push(c.p50 as f64);
                plain_p50[i].push(plain.p50 as f64);
                println!(
                    "bench: dns round {}/{iterations} {}: query p50 {:.1}us p99 {:.1}us; connect after {LEARN} learned: median call {:.2}us, mean {:.2}us; unjudged median call {:.2}us",
                    round + 1,
                    if with { "through the stub" } else { "straight to the responder" },
                    lat.p50 as f64 / 1e3,
                    lat.p99 as f64 / 1e3,
                    c.p50 as f64 / 1e3,
                    c.ns_per_op / 1e3,
                    plain.p50 as f64 / 1e3,
                );
                if let Some(costs) = &c.costs {
                    println!(
                        "bench: dns round {}/{iterations}: connect loop costs: {costs}",
                        round + 1
                    );
                }
                if let Some(costs) = &plain.costs {
                    println!(
                        "bench: dns round {}/{iterations}: unjudged connect loop costs: {costs}",
                        round + 1
                    );
                }
            }
        }
        if let Some(st) = learned.last() {
            println!("bench: dns: stub status after the last round: {st}");
        }
        println!("bench: dns rows took {:.0}s", t0.elapsed().as_secs_f64());
        let us = |v: f64| format!("{:.1} us", v / 1e3);
        let (a50, b50) = (median(&p50[0]), median(&p50[1]));
        let (a99, b99) = (median(&p99[0]), median(&p99[1]));
        let added99 = b99 - a99;
        Ok(vec![
            Row {
                name: format!(
                    "DNS query (UDP, new socket each, {QUERIES} per round) straight to a loopback responder vs a grant holder's steered through the stub, p50"
                ),
                without: us(a50),
                with: us(b50),
                ratio: format!("+{}", us(b50 - a50)),
                target: "-".into(),
                pass: None,
            },
            Row {
                name: "the same, p99 (added latency per query)".into(),
                without: us(a99),
                with: us(b99),
                ratio: format!("+{}", us(added99)),
                target: format!("added p99 <= {} ms", ADDED_P99_MAX.as_millis()),
                pass: Some(added99 <= ADDED_P99_MAX.as_nanos() as f64),
            },
            connect_row(
                format!(
                    "connect() loopback TCP to an address learned by name by a grant holder, {LEARN} learned addresses loaded, enforce mode (N={CONNECTS} per round, median call"
                ),
                &conn_p50,
            ),
            connect_row(
                "the same, loop mean (every call, preemptions and deferred frees included".into(),
                &conn,
            ),
            connect_row(
                format!(
                    "connect() loopback TCP by a process nobody judges (no grant, not an agent), the {LEARN} learned addresses loaded (N={CONNECTS} per round, median call"
                ),
                &plain_p50,
            ),
        ])
    }
}

/// A connect row judged against CONNECT_LIMIT: the medians over rounds of `per_round`
/// ([without, with], ns) and every round's figure; `name` is completed with the rounds.
fn connect_row(name: String, per_round: &[Vec<f64>; 2]) -> Row {
    let rounds = |v: &[f64]| v.iter().map(|x| format!("{:.2}", x / 1e3)).collect::<Vec<_>>();
    let (a, b) = (median(&per_round[0]), median(&per_round[1]));
    Row {
        name: format!(
            "{name}; rounds without [{}] us, with [{}] us)",
            rounds(&per_round[0]).join(", "),
            rounds(&per_round[1]).join(", ")
        ),
        without: format!("{:.2} us", a / 1e3),
        with: format!("{:.2} us", b / 1e3),
        ratio: format!("{:.3}", b / a),
        target: format!("<= {CONNECT_LIMIT:.2}"),
        pass: Some(b / a <= CONNECT_LIMIT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responder_answers_numbered_names_and_localhost() {
        let r = answer(&query(7, "h513.bench.test")).unwrap();
        assert_eq!(&r[..2], &7u16.to_be_bytes());
        assert_eq!(first_a(&r), Some(Ipv4Addr::new(127, 2, 2, 1)));
        let r = answer(&query(8, "TCP.bench.test")).unwrap();
        assert_eq!(first_a(&r), Some(Ipv4Addr::LOCALHOST));
        assert!(answer(&[0; 5]).is_none());
    }
}
