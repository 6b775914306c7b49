//! The alert stream a SOC relies on (issue 6), against the real daemon: every emitted event
//! validates against schema/enforcer.event.v1.json, the OCSF rendering carries OCSF's required
//! fields, and configured sinks (file, TLS syslog, HTTPS HEC) receive every alert at least once
//! across a receiver outage and a SIGKILL of the daemon.
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enforcer_tests::net::{HEC_TOKEN, Receiver, serve_hec, serve_syslog};
use enforcer_tests::pki::Pki;
use enforcer_tests::*;
use serde_json::Value;

fn schema_validator() -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/enforcer.event.v1.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles")
}

fn assert_schema_valid(v: &jsonschema::Validator, e: &Value) {
    let errors: Vec<String> =
        v.iter_errors(e).map(|err| format!("{} at {}", err, err.instance_path())).collect();
    assert!(errors.is_empty(), "event violates enforcer.event/v1: {errors:?}\n{e}");
}

/// OCSF 1.x base-event required attributes, plus what each class used here requires.
fn assert_ocsf(o: &Value) {
    for f in
        ["class_uid", "category_uid", "activity_id", "type_uid", "time", "severity_id", "metadata"]
    {
        assert!(!o[f].is_null(), "OCSF object lacks {f}: {o}");
    }
    let (class, activity) = (o["class_uid"].as_u64().unwrap(), o["activity_id"].as_u64().unwrap());
    assert_eq!(o["type_uid"].as_u64().unwrap(), class * 100 + activity, "{o}");
    assert_eq!(o["category_uid"].as_u64().unwrap(), class / 1000, "{o}");
    assert!(
        o["time"].as_i64().unwrap() > 1_600_000_000_000,
        "time must be ms since the epoch: {o}"
    );
    assert_eq!(o["metadata"]["product"]["name"], "enforcer");
    assert!(o["metadata"]["version"].as_str().unwrap().starts_with("1."), "{o}");
    match class {
        1001 => assert!(
            o["file"]["path"].is_string()
                && o["actor"]["process"].is_object()
                && o["device"].is_object(),
            "{o}"
        ),
        4001 => assert!(o["dst_endpoint"].is_object(), "{o}"),
        2004 => {
            assert!(
                o["finding_info"]["uid"].is_string() && o["finding_info"]["title"].is_string(),
                "{o}"
            );
            assert!(
                o["disposition_id"].as_u64().is_some_and(|d| [1, 2, 19, 24].contains(&d)),
                "{o}"
            );
        }
        _ => {}
    }
}

/// A daemon watching secret `deploy-key`: (cgroup, daemon, secret path, its dir).
fn secret_fixture(
    name: &str,
    extra: &str,
) -> Option<(TestCgroup, Daemon, String, tempfile::TempDir)> {
    if !root_or_skip(name) {
        return None;
    }
    let (dir, secret) = secret_file("deploy-key.json", "{\"key\": \"not-a-real-secret\"}\n");
    let cg = TestCgroup::new(name);
    // Top-level keys must precede tables: `extra` holds only tables.
    let d = Daemon::start(&cg, &format!("{}{extra}", secret_toml("deploy-key", &secret)));
    Some((cg, d, secret, dir))
}

#[test]
fn every_event_validates_against_the_schema_and_renders_as_ocsf() {
    let Some((cg, mut d, path, _dir)) = secret_fixture("schema", "") else { return };
    let (pid, _) = cg.run("cat", &[&path]);
    d.wait_events("file_open by cat", by("file_open", pid));
    // Connections too (no grant: allowed, or an alert for an [[agent]]; either must validate).
    let port = tcp_listener();
    cg.run("bash", &["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port} 2>/dev/null; true")]);
    let st = d.stop();
    assert!(st.success(), "{}", d.log());

    let v = schema_validator();
    let raw = d.raw_events();
    assert!(raw.len() >= 3, "expected agent_started, file_open, agent_stopped at least: {raw:?}");
    for e in &raw {
        assert_schema_valid(&v, e);
    }
    // The same lines as the typed events the rest of the tests read.
    let events = d.events();
    assert_eq!(events.len(), raw.len());
    let alerts = events.iter().filter(|e| e.verdict != "allowed").count();
    assert!(alerts >= 1, "the unauthorised open must be an alert");

    let out = Command::new(enforcer_bin())
        .args(["events", "--format", "ocsf", "--state-dir"])
        .arg(d.state_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ocsf: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ocsf.len(), events.len());
    for o in &ocsf {
        assert_ocsf(o);
    }
    let finding = ocsf
        .iter()
        .find(|o| o["class_uid"] == 2004 && o["unmapped"]["kind"] == "file_open")
        .expect("a Detection Finding for the open");
    assert_eq!(finding["finding_info"]["attacks"][0]["sub_technique"]["uid"], "T1552.001");
    assert_eq!(finding["disposition_id"], 19, "monitor mode: Alert");
    assert_eq!(finding["evidences"][0]["file"]["path"], path);
}

// ---- delivery -----------------------------------------------------------------------------

fn wait_until(what: &str, secs: u64, d: &Daemon, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\nlog:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every id in `want` is in `got`, and the first arrivals follow the outbox order.
fn assert_delivered(sink: &str, want: &[String], got: &[String]) {
    let mut seen = HashSet::new();
    let firsts: Vec<&String> = got.iter().filter(|id| seen.insert(*id)).collect();
    let missing: Vec<&String> = want.iter().filter(|id| !seen.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{sink}: {} of {} alerts never arrived: {:?}",
        missing.len(),
        want.len(),
        &missing[..missing.len().min(5)]
    );
    let order: Vec<usize> =
        firsts.iter().filter_map(|id| want.iter().position(|w| w == *id)).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{sink}: first arrivals out of outbox order");
}

fn alert_ids(d: &Daemon) -> Vec<String> {
    let mut all = Vec::new();
    for p in [".3", ".2", ".1", ""] {
        let Ok(t) = std::fs::read_to_string(d.state_dir().join(format!("events.jsonl{p}"))) else {
            continue;
        };
        // A line torn by the SIGKILL is skipped; every complete line must be an event.
        all.extend(
            t.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .map(|v| {
                    serde_json::from_value::<Event>(v.clone())
                        .unwrap_or_else(|e| panic!("not an event ({e}): {v}"))
                })
                .filter(|e| {
                    e.verdict != "allowed" && (e.kind == "file_open" || e.kind == "connect")
                })
                .map(|e| e.id),
        );
    }
    all
}

fn file_ids(path: &Path) -> Vec<String> {
    let mut all = Vec::new();
    // Oldest backup first (the sink keeps up to max_backups = 50).
    let names: Vec<String> =
        (1..=50).rev().map(|i| format!(".{i}")).chain(std::iter::once(String::new())).collect();
    for p in names {
        let Ok(t) = std::fs::read_to_string(format!("{}{p}", path.display())) else { continue };
        all.extend(
            t.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .map(|e| e["id"].as_str().unwrap_or_default().to_string()),
        );
    }
    all
}

#[test]
fn sinks_get_every_alert_across_receiver_outage_and_daemon_sigkill() {
    if !root_or_skip("sinks") {
        return;
    }
    let work = tempfile::Builder::new().prefix("enforcer-sinks-").tempdir().unwrap();
    let tls = Pki::localhost(work.path());
    let syslog_got = Arc::new(Mutex::new(Vec::new()));
    let hec_got = Arc::new(Mutex::new(Vec::new()));
    let syslog = Receiver::start(0, tls.server.clone(), syslog_got.clone(), serve_syslog);
    let hec = Receiver::start(0, tls.server.clone(), hec_got.clone(), serve_hec);
    let sink_file = work.path().join("alerts/alerts.jsonl");
    let sinks = format!(
        "[[sink]]\nname = \"file\"\ntype = \"file\"\npath = \"{}\"\nverdicts = [\"no_grant\", \"expired\", \"revoked\", \"out_of_intent\"]\nmax_bytes = 65536\nmax_backups = 50\n\
         [[sink]]\nname = \"syslog\"\ntype = \"syslog\"\naddress = \"127.0.0.1:{}\"\ntls = true\nca_file = \"{}\"\nserver_name = \"localhost\"\nmin_severity = \"high\"\n\
         [[sink]]\nname = \"hec\"\ntype = \"splunk_hec\"\nurl = \"https://localhost:{}/services/collector/event\"\ntoken = \"{HEC_TOKEN}\"\nca_file = \"{}\"\nmin_severity = \"high\"\n",
        sink_file.display(),
        syslog.port,
        tls.ca.display(),
        hec.port,
        tls.ca.display()
    );
    let Some((cg, d, path, _dir)) = secret_fixture("sinks", &sinks) else { return };
    assert!(
        d.state_dir().join("sinks").is_dir(),
        "the daemon did not start the alert sinks: it must call alert::spawn after opening the event store (issue 6 wiring)\n{}",
        d.log()
    );
    let open = |n: usize| {
        for _ in 0..n {
            cg.run("cat", &[&path]);
        }
    };
    open(50);
    // The syslog receiver dies mid-stream and comes back on the same port.
    let port = syslog.port;
    syslog.kill();
    open(50);
    std::thread::sleep(Duration::from_millis(500));
    let syslog = Receiver::start(port, tls.server.clone(), syslog_got.clone(), serve_syslog);
    open(50);

    // SIGKILL the daemon mid-stream, then start it again on the same state. Its decision
    // mismatches cannot be read after the kill: now.
    let mut d = d;
    d.assert_no_decision_mismatches();
    let child = d.child.take().unwrap();
    let opener = {
        let cgpath = cg.path.clone();
        let p = path.clone();
        std::thread::spawn(move || {
            for _ in 0..100 {
                let _ = Command::new("sh")
                    .arg("-c")
                    .arg(format!("echo 0 > {}/cgroup.procs; cat {p} >/dev/null", cgpath.display()))
                    .status();
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let mut child = child;
    let _ = child.wait();
    opener.join().unwrap();
    d.relaunch();
    open(50);

    let want = alert_ids(&d);
    assert!(want.len() >= 200, "expected at least 200 alerts in the outbox, got {}", want.len());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: HashSet<String> = file_ids(&sink_file).into_iter().collect();
        let missing: Vec<&String> = want.iter().filter(|id| !got.contains(*id)).collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let all =
                std::fs::read_to_string(d.state_dir().join("events.jsonl")).unwrap_or_default();
            let ex: Vec<&str> = all.lines().filter(|l| l.contains(missing[0].as_str())).collect();
            panic!(
                "file sink: {} of {} missing, e.g. {:?}\n{:?}\nlog:\n{}",
                missing.len(),
                want.len(),
                &missing[..missing.len().min(3)],
                ex,
                d.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_until("every alert at the syslog receiver", 30, &d, || {
        let got: HashSet<String> = syslog_got.lock().unwrap().iter().cloned().collect();
        want.iter().all(|id| got.contains(id))
    });
    wait_until("every alert at the HEC receiver", 30, &d, || {
        let got: HashSet<String> = hec_got.lock().unwrap().iter().cloned().collect();
        want.iter().all(|id| got.contains(id))
    });
    assert_delivered("file", &want, &file_ids(&sink_file));
    assert_delivered("syslog", &want, &syslog_got.lock().unwrap());
    assert_delivered("hec", &want, &hec_got.lock().unwrap());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sink_file).unwrap().permissions().mode() & 0o777, 0o600);
    syslog.kill();
}
