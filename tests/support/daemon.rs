//! A real daemon confined to a test cgroup: its config, status, CLI, API and stored events.
//! Stopping it (SIGTERM, SIGKILL, or the drop at the end of a test that did not fail) first
//! asserts that it counted no decision mismatches.
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use enforcer::event::Event;
use serde_json::Value;

use crate::cgroup::{SEQ, TestCgroup};
use crate::env::{enforcer_bin, time_scale};
use crate::events::parse_events;

/// A running daemon with its own config, runtime and state directories.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// bpffs pin dir of this daemon; removed when the test is done, so programs of a
    /// daemon killed with SIGKILL never outlive the test.
    pub pin_dir: PathBuf,
    /// A command the daemon runs under (e.g. `setpriv --bounding-set=-kill --`); empty: none.
    pub wrapper: Vec<String>,
}

impl Daemon {
    /// Writes a config (cgroup_root = the test cgroup, private dirs) plus `extra`
    /// (secrets etc.), starts the daemon and waits until `enforcer status` answers.
    pub fn start(cgroup: &TestCgroup, extra: &str) -> Daemon {
        Daemon::configure(cgroup, extra).launch()
    }

    pub fn configure(cgroup: &TestCgroup, extra: &str) -> Daemon {
        let dir = tempfile::Builder::new().prefix("enforcer-test-").tempdir().unwrap();
        let config = dir.path().join("enforcer.toml");
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/enforcer-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        // `mode` may be set by `extra` (it must then come first in it).
        let mode = if extra.trim_start().starts_with("mode") { "" } else { "mode = \"monitor\"\n" };
        let text = format!(
            "{mode}host = \"test-host\"\ncgroup_root = \"{}\"\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\npin_dir = \"{}\"\n{extra}\n",
            cgroup.path.display(),
            dir.path().join("run").display(),
            dir.path().join("state").display(),
            pin_dir.display(),
        );
        std::fs::write(&config, text).unwrap();
        Daemon { child: None, dir, config, pin_dir, wrapper: Vec::new() }
    }

    pub fn launch(mut self) -> Daemon {
        self.spawn();
        self
    }

    /// Starts the daemon again on the same config, runtime, state and pin dirs (after `stop`
    /// or `kill9`).
    pub fn relaunch(&mut self) {
        assert!(self.child.is_none(), "relaunch: the daemon is still running");
        self.spawn();
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(enforcer_bin());
                c
            }
            None => Command::new(enforcer_bin()),
        };
        let child = cmd
            .args(["daemon", "--config"])
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn enforcer daemon");
        self.child = Some(child);
        let limit = Duration::from_secs(30) * time_scale();
        let deadline = Instant::now() + limit;
        loop {
            if self.status_ok() {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early ({st}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "daemon not ready after {limit:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn status_ok(&self) -> bool {
        Command::new(enforcer_bin())
            .args(["status", "--runtime-dir"])
            .arg(self.runtime_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn try_status_json(&self) -> Result<Value, String> {
        let out = Command::new(enforcer_bin())
            .args(["status", "--json", "--runtime-dir"])
            .arg(self.runtime_dir())
            .output()
            .map_err(|e| format!("run enforcer status: {e}"))?;
        if !out.status.success() {
            return Err(format!("status failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("status JSON: {e}"))
    }

    pub fn status_json(&self) -> Value {
        self.try_status_json().unwrap_or_else(|e| panic!("{e}"))
    }

    fn events_text(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("events.jsonl")).unwrap_or_default()
    }

    /// Every stored event, typed.
    pub fn events(&self) -> Vec<Event> {
        parse_events(&self.events_text())
    }

    /// Every stored event as raw JSON: for schema validation and checks of field absence.
    pub fn raw_events(&self) -> Vec<Value> {
        self.events_text()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits (up to 10 s) for events matching `pred`; returns them all once at least one
    /// is there, after a short settle so duplicates would show.
    pub fn wait_events(&self, what: &str, pred: impl Fn(&Event) -> bool) -> Vec<Event> {
        let limit = Duration::from_secs(10) * time_scale();
        let deadline = Instant::now() + limit;
        loop {
            let found: Vec<Event> = self.events().into_iter().filter(|e| pred(e)).collect();
            if !found.is_empty() {
                std::thread::sleep(Duration::from_millis(300));
                return self.events().into_iter().filter(|e| pred(e)).collect();
            }
            assert!(
                Instant::now() < deadline,
                "no event {what} within {limit:?}; events:\n{}\nlog:\n{}",
                self.dump(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Exactly one event matching `pred`.
    pub fn one_event(&self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        let mut v = self.wait_events(what, pred);
        assert_eq!(v.len(), 1, "expected exactly one event {what}, got {}:\n{v:#?}", v.len());
        v.remove(0)
    }

    /// The stored events as written (JSON lines), for failure messages.
    pub fn dump(&self) -> String {
        self.events_text()
    }

    /// Events this daemon instance stored: from the last `agent_started` on.
    fn stored_since_start(&self) -> u64 {
        let lines: Vec<Value> =
            self.events_text().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let start = lines.iter().rposition(|e| e["kind"] == "agent_started").unwrap_or(0);
        (lines.len() - start) as u64
    }

    /// The status counts no decision mismatch (a connect where decide.rs and the kernel
    /// disagreed); else the failure message with the status JSON. The status is refreshed
    /// once a second: waits (up to 3 s) for one that counts every event stored so far.
    fn decision_mismatch_error(&self) -> Option<String> {
        let stored = self.stored_since_start();
        let deadline = Instant::now() + Duration::from_secs(3) * time_scale();
        let status = loop {
            let st = match self.try_status_json() {
                Ok(st) => st,
                Err(e) => {
                    return Some(format!(
                        "cannot read the status to check decision_mismatches: {e}\nlog:\n{}",
                        self.log()
                    ));
                }
            };
            if st["events_total"].as_u64().unwrap_or(0) >= stored || Instant::now() > deadline {
                break st;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if status["counts"]["decision_mismatches"].as_u64() == Some(0) {
            return None;
        }
        Some(format!(
            "decision_mismatches != 0 (decide.rs and the kernel disagreed):\n{status:#}\nlog:\n{}",
            self.log()
        ))
    }

    /// Asserts the running daemon counted no decision mismatches.
    pub fn assert_no_decision_mismatches(&self) {
        if let Some(e) = self.decision_mismatch_error() {
            panic!("{e}");
        }
    }

    /// Checks decision mismatches, then SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        assert!(self.child.is_some(), "daemon running");
        self.assert_no_decision_mismatches();
        let child = self.child.as_mut().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10) * time_scale();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(Instant::now() < deadline, "daemon ignored SIGTERM for 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Checks decision mismatches (they cannot be read after), then SIGKILL: no cleanup by
    /// the daemon; its pins stay and keep enforcing.
    pub fn kill9(&mut self) {
        if self.child.is_some() {
            self.assert_no_decision_mismatches();
        }
        self.sigkill();
    }

    fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Removes the pins (detaching any programs a killed daemon left).
    pub fn remove_pins(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.pin_dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }

    /// Runs `enforcer ARGS` against this daemon (its runtime dir via ENFORCER_RUNTIME_DIR).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(enforcer_bin())
            .args(args)
            .env("ENFORCER_RUNTIME_DIR", self.runtime_dir())
            .output()
            .expect("run enforcer")
    }

    /// `curl --unix-socket` against the API: (HTTP status, parsed JSON body).
    pub fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let sock = self.runtime_dir().join("mint.sock");
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&sock)
            .args(["-X", method]);
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
        }
        cmd.arg(format!("http://localhost{path}"));
        let out = cmd.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A test that already failed keeps its own message; otherwise the daemon still
        // running at the end must have counted no decision mismatch.
        let running = self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none());
        let error = if running && !std::thread::panicking() {
            self.decision_mismatch_error()
        } else {
            None
        };
        self.sigkill();
        self.remove_pins();
        if let Some(e) = error {
            panic!("{e}");
        }
    }
}
