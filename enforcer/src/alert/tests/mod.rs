//! Sinks against real receivers (files here, TLS syslog and HTTPS HEC on loopback in `tls`),
//! driven through the real outbox (`store::EventStore`) and `spawn`; no root needed.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;
use crate::event::{self, DestinationRef, FileRef, GrantRef, ProcessRef};
use crate::policy::{Severity, SinkFormat, SinkKind};
use crate::store::{EventStore, OutboxReader, Position};

mod tls;

fn ev(i: u64) -> Event {
    let violation = i.is_multiple_of(3);
    Event {
        schema: event::SCHEMA.into(),
        id: format!("t-{i}"),
        time: event::rfc3339(chrono::Utc::now()),
        host: "test-host".into(),
        kind: if i.is_multiple_of(2) { "file_open" } else { "connect" }.into(),
        verdict: if violation { "no_grant" } else { "allowed" }.into(),
        action: if violation { "alerted" } else { "allowed" }.into(),
        mode: "monitor".into(),
        process: ProcessRef {
            pid: 100,
            ppid: 1,
            uid: 1000,
            exe: "/usr/bin/python3".into(),
            cmdline: "python3 x.py".into(),
            cgroup: "/t".into(),
            ..Default::default()
        },
        file: i.is_multiple_of(2).then(|| FileRef {
            path: "/etc/k.json".into(),
            dev: 1,
            ino: 2,
            secret: "k".into(),
        }),
        destination: (i % 2 == 1).then(|| DestinationRef {
            ip: "127.0.0.1".into(),
            port: 443,
            protocol: "tcp".into(),
            name: None,
        }),
        grant: None,
        socket: None,
        ipc: None,
        decision_path: vec!["subject resolved".into()],
        secrets: vec![],
        credentials: vec![],
        mitre: if violation { vec!["T1552.001".into()] } else { vec![] },
        severity: if violation { "high" } else { "info" }.into(),
        message: None,
    }
}

fn config(state: &Path, sinks_toml: &str) -> Config {
    let text = format!("state_dir = \"{}\"\n{sinks_toml}", state.display());
    crate::policy::load_str("/t/enforcer.toml", &text).unwrap_or_else(|e| panic!("{e}"))
}

fn write_events(store: &mut EventStore, range: std::ops::Range<u64>) {
    for i in range {
        store.append(&ev(i)).unwrap();
    }
    store.flush().unwrap();
}

/// Ids delivered, in arrival order (duplicates kept).
fn ids_of_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].as_str().unwrap().to_string())
        .collect()
}

/// Ids of the complete lines of a file a sink may be writing right now (the last line may
/// still be partial), and the number of complete lines that are not JSON: the torn line a
/// killed writer leaves, which the next open ends with a newline.
fn ids_of_written_lines(text: &str) -> (Vec<String>, usize) {
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let mut torn = 0;
    let mut ids = Vec::new();
    for l in complete.lines().filter(|l| !l.is_empty()) {
        match serde_json::from_str::<Value>(l) {
            Ok(v) => ids.push(v["id"].as_str().unwrap().to_string()),
            Err(_) => torn += 1,
        }
    }
    (ids, torn)
}

/// Every id in `0..n` arrived, and the first arrival of each is in order.
fn assert_all_in_order(got: &[String], n: u64) {
    let mut seen = HashSet::new();
    let firsts: Vec<u64> = got
        .iter()
        .filter(|id| seen.insert((*id).clone()))
        .filter_map(|id| id.strip_prefix("t-")?.parse().ok())
        .collect();
    let missing: Vec<u64> = (0..n).filter(|i| !seen.contains(&format!("t-{i}"))).collect();
    assert!(
        missing.is_empty(),
        "{} ids never arrived, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(firsts.windows(2).all(|w| w[0] < w[1]), "first arrivals out of order");
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_rotated(path: &Path) -> String {
    let mut files: Vec<PathBuf> = (1..)
        .map(|i| PathBuf::from(format!("{}.{i}", path.display())))
        .take_while(|p| p.exists())
        .collect();
    files.reverse();
    files.push(path.to_path_buf());
    files.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
}

#[test]
fn sink_config_parses_and_reports_positions() {
    let cfg = config(
        Path::new("/s"),
        "[[sink]]\nname = \"f\"\ntype = \"file\"\npath = \"/var/log/enforcer/alerts.jsonl\"\nmin_severity = \"high\"\nverdicts = [\"no_grant\"]\nformat = \"ocsf\"\nrate_limit_per_second = 10\n\n[[sink]]\nname = \"hec\"\ntype = \"splunk_hec\"\nurl = \"https://splunk.example:8088/services/collector/event\"\ntoken = \"s3cr3t\"\n[outbox]\nmax_backups = 5\n",
    );
    assert_eq!(cfg.sinks.len(), 2);
    assert_eq!(cfg.sinks[0].min_severity, Severity::High);
    assert_eq!(cfg.sinks[0].format, SinkFormat::Ocsf);
    assert_eq!(
        cfg.sinks[0].kind,
        SinkKind::File(crate::policy::FileSinkConfig {
            path: "/var/log/enforcer/alerts.jsonl".into(),
            max_bytes: crate::policy::DEFAULT_SINK_MAX_BYTES,
            max_backups: crate::policy::DEFAULT_SINK_MAX_BACKUPS,
        })
    );
    // The URL is parsed once, at load.
    let SinkKind::SplunkHec(hec) = &cfg.sinks[1].kind else { panic!("{:?}", cfg.sinks[1]) };
    assert_eq!(
        hec.https.url,
        crate::policy::HttpsUrl {
            host: "splunk.example".into(),
            port: 8088,
            path: "/services/collector/event".into()
        }
    );
    assert_eq!(cfg.sinks[1].kind.type_name(), "splunk_hec");
    assert_eq!(cfg.outbox.max_backups, 5);
    assert!(!format!("{cfg:?}").contains("s3cr3t"), "token must never show in Debug output");

    let text = "[[sink]]\nname = \"a\"\ntype = \"webhook\"\nurl = \"http://x/y\"\n[[sink]]\nname = \"b\"\ntype = \"file\"\npath = \"/x\"\ntoken = \"t\"\n[[sink]]\nname = \"c\"\ntype = \"carrier-pigeon\"\n[[sink]]\nname = \"d\"\ntype = \"splunk_hec\"\nurl = \"https://h/services/collector/event\"\n";
    let err = crate::policy::load_str("/t/c.toml", text).unwrap_err().to_string();
    assert!(err.contains("/t/c.toml:4:7: url `http://x/y` must be https://"), "{err}");
    assert!(err.contains("/t/c.toml:9:9: `token` does not apply to sink type `file`"), "{err}");
    assert!(err.contains("/t/c.toml:12:8: invalid sink type `carrier-pigeon`"), "{err}");
    assert!(err.contains("/t/c.toml:14:8: sink `d` of type `splunk_hec` needs `token`"), "{err}");
}

#[test]
fn sink_config_carries_only_its_types_options() {
    let cfg = config(
        Path::new("/s"),
        "[[sink]]\nname = \"plain\"\ntype = \"syslog\"\naddress = \"h:514\"\nca_file = \"/ca.pem\"\n[[sink]]\nname = \"mtls\"\ntype = \"syslog\"\naddress = \"h:6514\"\ntls = true\nclient_cert = \"/c.pem\"\nclient_key = \"/k.pem\"\nserver_name = \"logs\"\n[[sink]]\nname = \"w\"\ntype = \"webhook\"\nurl = \"https://[::1]:9443/hook\"\nheaders = { X-Team = \"sec\" }\n",
    );
    use crate::policy::{ClientAuth, SyslogSinkConfig, TlsOptions};
    assert_eq!(
        cfg.sinks[0].kind,
        SinkKind::Syslog(SyslogSinkConfig { address: "h:514".into(), tls: None })
    );
    assert_eq!(
        cfg.sinks[1].kind,
        SinkKind::Syslog(SyslogSinkConfig {
            address: "h:6514".into(),
            tls: Some(TlsOptions {
                ca_file: None,
                client_auth: Some(ClientAuth { cert: "/c.pem".into(), key: "/k.pem".into() }),
                server_name: Some("logs".into()),
            }),
        })
    );
    let SinkKind::Webhook(w) = &cfg.sinks[2].kind else { panic!("{:?}", cfg.sinks[2]) };
    assert_eq!((w.url.connect_host(), w.url.port, w.url.path.as_str()), ("::1", 9443, "/hook"));
    assert_eq!(w.headers, vec![("X-Team".to_string(), "sec".to_string())]);
}

#[test]
fn ocsf_mapping() {
    let v = ocsf::to_ocsf(&ev(0)); // violation on a file open
    assert_eq!(v["class_uid"], 2004);
    assert_eq!(v["type_uid"], 200401);
    assert_eq!(v["category_uid"], 2);
    assert_eq!(v["disposition_id"], 19);
    assert_eq!(v["severity_id"], 4);
    assert_eq!(v["finding_info"]["attacks"][0]["sub_technique"]["uid"], "T1552.001");
    assert_eq!(v["finding_info"]["attacks"][0]["technique"]["uid"], "T1552");
    assert_eq!(v["metadata"]["product"]["name"], "enforcer");
    assert_eq!(v["evidences"][0]["file"]["path"], "/etc/k.json");
    assert!(v["time"].as_i64().unwrap() > 1_600_000_000_000);
    let v = ocsf::to_ocsf(&ev(2)); // allowed file open
    assert_eq!(
        (v["class_uid"].as_u64(), v["activity_id"].as_u64(), v["type_uid"].as_u64()),
        (Some(1001), Some(14), Some(100114))
    );
    assert_eq!(v["file"]["path"], "/etc/k.json");
    let v = ocsf::to_ocsf(&ev(1)); // allowed connect
    assert_eq!((v["class_uid"].as_u64(), v["type_uid"].as_u64()), (Some(4001), Some(400101)));
    assert_eq!(v["dst_endpoint"]["port"], 443);
    let mut e = ev(3);
    e.action = "denied".into();
    e.grant = Some(GrantRef {
        id: "g".into(),
        intent: "deploy".into(),
        expires_at: e.time.clone(),
        expired_for_ms: Some(5),
    });
    let v = ocsf::to_ocsf(&e);
    assert_eq!(v["disposition_id"], 2);
    assert_eq!(v["unmapped"]["grant"]["expired_for_ms"], 5);
    e.action = "killed".into();
    assert_eq!(ocsf::to_ocsf(&e)["disposition_id"], 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_under_load_rotates_and_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let out = dir.path().join("out/alerts.jsonl");
    let cfg = config(
        &state,
        &format!(
            "[outbox]\nrotate_bytes = 1000000\nmax_backups = 2\n[[sink]]\nname = \"f\"\ntype = \"file\"\npath = \"{}\"\nmax_bytes = 4000000\nmax_backups = 1000\n",
            out.display()
        ),
    );
    let mut store = EventStore::open(&state).unwrap();
    let sinks = spawn(&cfg, &state, "test-host").unwrap();
    let n = 100_000u64;
    let start = Instant::now();
    for chunk in 0..(n / 1000) {
        write_events(&mut store, chunk * 1000..(chunk + 1) * 1000);
    }
    let count = || read_rotated(&out).lines().count() as u64;
    wait_for("all events in the file sink", 60, || count() >= n).await;
    let secs = start.elapsed().as_secs_f64();
    eprintln!("file sink: {n} events in {secs:.2}s = {:.0} alerts/s", n as f64 / secs);
    let got = ids_of_lines(&read_rotated(&out));
    assert_all_in_order(&got, n);
    assert_eq!(got.len() as u64, n, "no duplicates without a failure");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(PathBuf::from(format!("{}.1", out.display())).exists(), "sink file never rotated");
    let m = sinks.metrics_text();
    assert!(
        m.contains(&format!("enforcer_sink_delivered_total{{sink=\"f\",type=\"file\"}} {n}")),
        "{m}"
    );
    assert!(m.contains("enforcer_sink_backlog_bytes{sink=\"f\",type=\"file\"} 0"), "{m}");
    // logrotate: move the file away, then SIGHUP -> reopen_files.
    let moved = dir.path().join("out/moved.jsonl");
    std::fs::rename(&out, &moved).unwrap();
    sinks.reopen_files();
    write_events(&mut store, n..n + 10);
    wait_for("a reopened file", 10, || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.lines().count() == 10)
    })
    .await;
    sinks.shutdown().await;
}

#[test]
fn daemon_killed_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let out = dir.path().join("alerts.jsonl");
    let cfg = config(
        &state,
        &format!("[[sink]]\nname = \"f\"\ntype = \"file\"\npath = \"{}\"\n", out.display()),
    );
    let mut store = EventStore::open(&state).unwrap();
    // First life: the delivery runs on its own runtime, dropped without shutdown (as a kill
    // would leave it) while events are still arriving.
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let _sinks = rt.block_on(async { spawn(&cfg, &state, "h").unwrap() });
    for k in 0..20 {
        write_events(&mut store, k * 500..(k + 1) * 500);
        std::thread::sleep(Duration::from_millis(5));
    }
    rt.shutdown_background();
    write_events(&mut store, 10_000..20_000);
    // Whatever the first life delivered (timing on a loaded host decides how much), the
    // second must deliver the rest, in order. The real-daemon SIGKILL test in
    // tests/alerts.rs covers the kill itself.
    // Second life resumes from the cursor.
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let sinks = spawn(&cfg, &state, "h").unwrap();
        wait_for("every event after restart", 30, || {
            ids_of_written_lines(&std::fs::read_to_string(&out).unwrap_or_default())
                .0
                .iter()
                .collect::<HashSet<_>>()
                .len()
                >= 20_000
        })
        .await;
        sinks.shutdown().await;
        let (ids, torn) = ids_of_written_lines(&std::fs::read_to_string(&out).unwrap());
        assert!(torn <= 1, "{torn} torn lines: only the one kill may leave one");
        assert_all_in_order(&ids, 20_000);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_reports_suppressed_count() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let out = dir.path().join("alerts.jsonl");
    let cfg = config(
        &state,
        &format!(
            "[[sink]]\nname = \"f\"\ntype = \"file\"\npath = \"{}\"\nrate_limit_per_second = 100\nmin_severity = \"high\"\n",
            out.display()
        ),
    );
    let mut store = EventStore::open(&state).unwrap();
    let sinks = spawn(&cfg, &state, "h").unwrap();
    write_events(&mut store, 0..3000); // 1000 are high severity
    let summary = || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|v| v["kind"] == "alerts_suppressed")
    };
    wait_for("a suppression summary", 10, || summary().is_some()).await;
    let text = std::fs::read_to_string(&out).unwrap();
    let delivered = text.lines().filter(|l| l.contains("\"no_grant\"")).count();
    let s = summary().unwrap();
    let msg = s["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("suppressed {} events", 1000 - delivered)),
        "{delivered} delivered; {msg}"
    );
    assert_eq!(delivered, 100);
    assert!(
        sinks
            .metrics_text()
            .contains("enforcer_sink_suppressed_total{sink=\"f\",type=\"file\"} 900")
    );
    sinks.shutdown().await;
}

#[test]
fn rotation_keeps_what_a_lagging_sink_needs_until_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    std::fs::create_dir_all(state.join(store::CURSOR_DIR)).unwrap();
    store::set_limits(state, 4096, 1, 1 << 30);
    let mut s = EventStore::open(state).unwrap();
    write_events(&mut s, 0..5);
    // A sink that read nothing yet: its cursor is on the first generation.
    let first = std::fs::metadata(state.join(store::FILE_NAME))
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        })
        .unwrap();
    store::save_cursor(
        state,
        "lag",
        &Position { ino: first, offset: 0, first_id: Some("t-0".into()) },
    )
    .unwrap();
    write_events(&mut s, 5..200); // many rotations
    let mut r = OutboxReader::new(
        state,
        Some(Position { ino: first, offset: 0, first_id: Some("t-0".into()) }),
    );
    let mut ids = vec![];
    loop {
        let lines = r.read("lag", 1000, 1 << 20).unwrap();
        if lines.is_empty() {
            break;
        }
        ids.extend(lines.iter().map(|l| {
            serde_json::from_str::<Value>(&l.text).unwrap()["id"].as_str().unwrap().to_string()
        }));
    }
    assert_all_in_order(&ids, 200);
    // Now bound the outbox: the lagging sink's oldest file goes, with a notice.
    let _ = store::take_notices();
    store::set_limits(state, 4096, 1, 8192);
    write_events(&mut s, 200..260);
    let notices = store::take_notices();
    assert!(notices.iter().any(|n| n.contains("sink(s) lag")), "{notices:?}");
}

#[test]
fn torn_last_line_is_ended_before_new_records() {
    // What a kill in the middle of a multi-write batch leaves: a fragment with no newline.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts.jsonl");
    std::fs::write(&path, "{\"id\":\"t-0\"}\n{\"id\":\"t-").unwrap();
    let cfg =
        crate::policy::FileSinkConfig { path: path.clone(), max_bytes: 1 << 20, max_backups: 1 };
    let mut sink = super::file::FileSink::new(&cfg);
    let item = Item { event: ev(1), payload: "{\"id\":\"t-1\"}".into() };
    sink.send(&[item]).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, "{\"id\":\"t-0\"}\n{\"id\":\"t-\n{\"id\":\"t-1\"}\n");
    assert_eq!(ids_of_written_lines(&text), (vec!["t-0".to_string(), "t-1".to_string()], 1));
}
