//! The results table: rows, the console rendering and target/bench.md.

use super::grants::{self, CLIENTS, GRANTS_PER_HOLDER, N_GRANTS, N_HOLDERS};
use super::rounds::{Decisions, EnforceRound, GrantRound};
use super::{DECISION_P99_MAX_US, ISSUE_P99_MAX, ISSUE_RATE_MIN, SECRET_OPENS, VIOLATION_CONNECTS};
use anyhow::Result;

/// The rounds that succeeded, and a failing row naming the first error when any did not.
pub(super) fn split_rounds<'a, T>(rounds: &'a [Result<T>], what: &str) -> (Vec<&'a T>, Vec<Row>) {
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

/// Rows of the enforce rounds: violation-to-denial for connects (in-kernel) and secret opens
/// (fanotify decision latency, and the open call as the worker sees it); medians of rounds,
/// against the per-call medians without the daemon.
pub(super) fn enforce_rows(
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
    let op = med(ok.iter().map(|e| e.open_plain).collect());
    rows.push(Row {
        name: format!(
            "secret-open cost, fanotify backend: open()+close() of the secret / of a plain file, both by a grant \
             holder under the same enforce-mode daemon (per-call medians of N={SECRET_OPENS}); BPF-LSM: `bench --kernel`"
        ),
        without: format!("{:.2} us (plain)", op / 1e3),
        with: format!("{:.2} us (secret)", oa / 1e3),
        ratio: format!("{:.2}", oa / op),
        target: "- (<= 1.5 is BPF-LSM's target)".into(),
        pass: None,
    });
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
    rows.push(per_call(
        format!("time to denial, open() of the secret without a grant while a sparse 2 TiB copy of cat opens it in a loop (issue 13 case 1; median of N={SECRET_OPENS}, all EPERM)"),
        bo,
        med(ok.iter().map(|e| e.open_attacked).collect()),
        "EPERM",
        Some(true),
    ));
    rows.push(decision_row(
        "denied opens while the 2 TiB attacker runs (its own opens included)",
        "(any round, all opens)",
        ok.iter().map(|e| e.attacked).collect(),
    ));
    rows
}

/// Rows of the grant rounds: issuance latency (all rounds' requests pooled), throughput (median
/// of rounds), connect with N_GRANTS live grants and connect by a grant holder (vs the same
/// loops in the rounds without the daemon).
pub(super) fn grant_rows(
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
            "grant issuance latency, POST /v1/grants ({N_GRANTS} per round on {N_HOLDERS} holders, {CLIENTS} keep-alive connections from one client thread, {:.0}/s offered, timed from when each was due; {} rounds pooled)",
            grants::OFFERED_RATE,
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
    // The client runs on the same cores: its CPU is load the daemon would not have in use.
    let per_grant = |cpu: fn(&grants::Issuance) -> std::time::Duration| {
        median(
            &ok.iter()
                .map(|g| {
                    cpu(&g.issuance).as_secs_f64() * 1e6 / g.issuance.latencies.len().max(1) as f64
                })
                .collect::<Vec<_>>(),
        )
    };
    rows.push(Row {
        name: "grant issuance CPU per grant, user + system (median of rounds)".into(),
        without: "-".into(),
        with: format!(
            "daemon {:.0} us, bench client {:.0} us (same cores)",
            per_grant(|i| i.daemon_cpu),
            per_grant(|i| i.client_cpu)
        ),
        ratio: "-".into(),
        target: "-".into(),
        pass: None,
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

pub(super) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len().is_multiple_of(2) { (v[m - 1] + v[m]) / 2.0 } else { v[m] }
}

pub(super) struct Row {
    pub(super) name: String,
    pub(super) without: String,
    pub(super) with: String,
    pub(super) ratio: String,
    pub(super) target: String,
    pub(super) pass: Option<bool>,
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

pub(super) fn render_console(rows: &[Row]) -> String {
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

pub(super) fn render(rows: &[Row], iterations: usize) -> String {
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
