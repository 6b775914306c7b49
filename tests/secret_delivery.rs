//! Daemon-held static secrets: the value sits in a root-only file only the daemon reads,
//! and is delivered to a process whose subtree holds a live grant covering the secret
//! (`enforcer secret get NAME`, `enforcer run --env VAR=secret:NAME`). Everyone else is
//! refused; every delivery and refusal is an event, and the value is in none of them.
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use enforcer_tests::*;
use serde_json::Value;

const VALUE: &str = "db-Pa55w0rd-held-by-the-daemon";

struct Fixture {
    cg: TestCgroup,
    daemon: Daemon,
    value_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn fixture(name: &str) -> Option<Fixture> {
    if !root_or_skip(name) {
        return None;
    }
    let dir = tempfile::Builder::new().prefix("enforcer-held-").tempdir().unwrap();
    let value_file = dir.path().join("db");
    std::fs::write(&value_file, format!("{VALUE}\n")).unwrap();
    std::fs::set_permissions(&value_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cg = TestCgroup::new(name);
    let daemon = Daemon::start(
        &cg,
        &format!(
            "[[secret]]\nname = \"db\"\nvalue_file = \"{}\"\nkind = \"token\"\n\
             [[intent]]\nname = \"job\"\nagents = [{{ uid = 0 }}]\nsecrets = [\"db\"]\n\
             [[intent]]\nname = \"other\"\nagents = [{{ uid = 0 }}]\n",
            value_file.display()
        ),
    );
    Some(Fixture { cg, daemon, value_file, _dir: dir })
}

impl Fixture {
    fn enforcer(&self, args: &[&str]) -> std::process::Output {
        self.cg
            .command(enforcer_bin())
            .args(args)
            .env("ENFORCER_RUNTIME_DIR", self.daemon.runtime_dir())
            .output()
            .unwrap()
    }

    fn assert_value_never_stored(&self) {
        assert!(!self.daemon.dump().contains("Pa55w0rd"), "the value is in an event");
        assert!(!self.daemon.log().contains("Pa55w0rd"), "the value is in the log");
    }
}

fn refusal(f: &Fixture, out: &std::process::Output) -> Value {
    assert_eq!(out.status.code(), Some(1), "{out:?}\n{}", f.daemon.log());
    assert!(out.stdout.is_empty(), "nothing on stdout when refused: {out:?}");
    // `enforcer run` says which grant it got on stderr first; the JSON error is the last line.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or("");
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("JSON error ({e}): {out:?}\n{}", f.daemon.log()))
}

#[test]
fn granted_process_gets_the_value_and_each_delivery_is_an_event() {
    let Some(f) = fixture("held-get") else { return };
    let me = enforcer_bin();
    let out =
        f.enforcer(&["run", "--intent", "job", "--", me.to_str().unwrap(), "secret", "get", "db"]);
    assert!(out.status.success(), "{out:?}\n{}", f.daemon.log());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{VALUE}\n"),
        "the file's content exactly"
    );
    let e = f.daemon.one_event("secret_delivered", |e| e.kind == "secret_delivered");
    assert_eq!((e.verdict.as_str(), e.action.as_str()), ("allowed", "allowed"));
    assert_eq!(e.secrets, vec!["db".to_string()]);
    assert_eq!(e.grant.as_ref().unwrap().intent, "job");
    assert!(e.process.exe.ends_with("enforcer"), "{e:#?}");
    // --env: fetched by CMD's own process before it starts; one trailing newline dropped.
    let out = f.enforcer(&[
        "run",
        "--intent",
        "job",
        "--env",
        "DB_PASSWORD=secret:db",
        "--",
        "sh",
        "-c",
        "printf '%s|' \"$DB_PASSWORD\"",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{VALUE}|"));
    let delivered = f.daemon.wait_events("two deliveries", |e| e.kind == "secret_delivered");
    assert_eq!(delivered.len(), 2, "{delivered:#?}");
    f.assert_value_never_stored();
}

#[test]
fn refused_without_a_grant_covering_the_secret() {
    let Some(f) = fixture("held-refused") else { return };
    let me = enforcer_bin();
    // No grant at all.
    let err = refusal(&f, &f.enforcer(&["secret", "get", "db"]));
    assert_eq!(err["error"]["code"], "no_grant", "{err}");
    // A grant of an intent that does not cover it.
    let err = refusal(
        &f,
        &f.enforcer(&[
            "run",
            "--intent",
            "other",
            "--",
            me.to_str().unwrap(),
            "secret",
            "get",
            "db",
        ]),
    );
    assert_eq!(err["error"]["code"], "no_grant", "{err}");
    // Unknown secret.
    let err = refusal(
        &f,
        &f.enforcer(&[
            "run",
            "--intent",
            "job",
            "--",
            me.to_str().unwrap(),
            "secret",
            "get",
            "nope",
        ]),
    );
    assert_eq!(err["error"]["code"], "unknown_secret", "{err}");
    // --env refused: CMD never runs.
    let marker = f._dir.path().join("ran");
    let out = f.enforcer(&[
        "run",
        "--intent",
        "other",
        "--env",
        "X=secret:db",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!marker.exists(), "CMD ran without its secret");
    let refused = f.daemon.wait_events("secret_refused", |e| e.kind == "secret_refused");
    assert!(refused.len() >= 4, "{refused:#?}");
    assert!(
        refused.iter().all(|e| e.action == "denied" && e.verdict == "no_grant"),
        "{refused:#?}"
    );
    assert!(refused.iter().filter(|e| e.secrets == ["db"]).count() >= 3, "{refused:#?}");
    // A value file others could read is not delivered.
    std::fs::set_permissions(&f.value_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refusal(
        &f,
        &f.enforcer(&["run", "--intent", "job", "--", me.to_str().unwrap(), "secret", "get", "db"]),
    );
    assert_eq!(err["error"]["code"], "secret_unavailable", "{err}");
    assert!(f.daemon.events().iter().all(|e| e.kind != "secret_delivered"));
    f.assert_value_never_stored();
}

/// After the grant is revoked, the subtree that held it gets nothing more.
#[test]
fn refused_after_revoke() {
    let Some(f) = fixture("held-revoke") else { return };
    let me = enforcer_bin().display().to_string();
    let script = format!(
        "{me} secret get db >/dev/null && echo first; read _; {me} secret get db >/dev/null 2>&1 && echo second || echo refused"
    );
    let mut child =
        f.cg.command(enforcer_bin())
            .args(["run", "--intent", "job", "--", "sh", "-c", &script])
            .env("ENFORCER_RUNTIME_DIR", f.daemon.runtime_dir())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let mut out = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    assert_eq!(out.next().unwrap().unwrap(), "first");
    let grant =
        f.daemon.one_event("secret_delivered", |e| e.kind == "secret_delivered").grant.unwrap().id;
    let r = f.daemon.cli(&["grant", "revoke", &grant]);
    assert!(r.status.success(), "{r:?}");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"\n").unwrap();
    assert_eq!(out.next().unwrap().unwrap(), "refused");
    let _ = child.wait();
    f.daemon
        .wait_events("refusal after revoke", |e| e.kind == "secret_refused" && e.secrets == ["db"]);
    let _ = Command::new("true").status();
}
