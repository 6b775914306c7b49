//! Loading, validation positions, merging and path expansion. Destination and duration syntax
//! are tested next to their parsers.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::model::expand_paths_with_homes;
use super::*;

/// Every diagnostic of a failed `load_str("t.toml", text)`, as displayed.
fn errors(text: &str) -> Vec<String> {
    match load_str("t.toml", text) {
        Ok(cfg) => panic!("expected errors, got {cfg:#?}"),
        Err(d) => d.0.iter().map(ToString::to_string).collect(),
    }
}

/// The single diagnostic of a failed load, checked for exact position and a message fragment.
fn assert_error(text: &str, pos: &str, msg: &str) {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let want = format!("t.toml:{pos}: ");
    assert!(
        errs[0].starts_with(&want) && errs[0].contains(msg),
        "got {:?}, want {want}...{msg}",
        errs[0]
    );
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("enforcer-policy-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.0.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const EXAMPLE: &str = r#"
mode = "enforce"
host = "ci-runner-1"
cgroup_root = "/sys/fs/cgroup/unified/test"
runtime_dir = "/tmp/x/run"
state_dir = "/tmp/x/state"
pin_dir = "/sys/fs/bpf/enforcer-test"
policy_dir = "/etc/enforcer/policy.d"
socket_group = "enforcer"
[[secret]]
name = "deploy-key"
paths = ["/etc/ci/deploy-key.json"]
destinations = ["192.0.2.10/32:443"]
kind = "credentials_file"
[[intent]]
name = "deploy"
agents = [{ exe = "/usr/bin/python3" }, { uid = 1001 }]
secrets = ["deploy-key"]
destinations = ["192.0.2.10/32:443", "deploy.internal:443"]
max_ttl = "15m"
default_ttl = "5m"
on_violation = "deny"
revoke_on_violation = true
[[agent]]
exe = "/usr/local/bin/agent-runner"
"#;

#[test]
fn example_config_parses() {
    let cfg = load_str("/etc/enforcer/enforcer.toml", EXAMPLE).unwrap();
    assert_eq!(cfg.mode, Mode::Enforce);
    assert_eq!(cfg.mode.to_string(), "enforce");
    assert_eq!(cfg.host.as_deref(), Some("ci-runner-1"));
    assert_eq!(cfg.cgroup_root.as_deref(), Some(Path::new("/sys/fs/cgroup/unified/test")));
    assert_eq!(cfg.runtime_dir, Path::new("/tmp/x/run"));
    assert_eq!(cfg.state_dir, Path::new("/tmp/x/state"));
    assert_eq!(cfg.pin_dir, Path::new("/sys/fs/bpf/enforcer-test"));
    assert_eq!(cfg.policy_dir.as_deref(), Some(Path::new("/etc/enforcer/policy.d")));
    assert_eq!(cfg.socket_group.as_deref(), Some("enforcer"));
    assert_eq!(cfg.source, "/etc/enforcer/enforcer.toml");

    let s = cfg.secret("deploy-key").unwrap();
    assert_eq!(s.paths, ["/etc/ci/deploy-key.json"]);
    assert_eq!(s.destinations, ["192.0.2.10/32:443".parse::<Destination>().unwrap()]);
    assert_eq!(s.kind, SecretKind::CredentialsFile);

    let i = cfg.intent("deploy").unwrap();
    assert_eq!(
        i.agents,
        [
            AgentSelector { exe: Some("/usr/bin/python3".into()), ..Default::default() },
            AgentSelector { uid: Some(1001), ..Default::default() },
        ]
    );
    assert_eq!(i.secrets, ["deploy-key"]);
    assert_eq!(i.destinations.len(), 2);
    assert_eq!(
        i.destinations[1],
        Destination::Dns { name: "deploy.internal".into(), ports: PortRange::single(443) }
    );
    assert_eq!(i.max_ttl, Duration::from_secs(900));
    assert_eq!(i.default_ttl, Duration::from_secs(300));
    assert_eq!(i.on_violation, OnViolation::Deny);
    assert!(i.revoke_on_violation);

    assert_eq!(
        cfg.agents,
        [AgentSelector { exe: Some("/usr/local/bin/agent-runner".into()), ..Default::default() }]
    );
}

#[test]
fn defaults_when_keys_are_absent() {
    let cfg = load_str("/etc/enforcer/enforcer.toml", "").unwrap();
    assert_eq!(cfg.mode, Mode::Monitor);
    assert_eq!(cfg.host, None);
    assert_eq!(cfg.cgroup_root, None);
    assert_eq!(cfg.runtime_dir, Path::new("/run/enforcer"));
    assert_eq!(cfg.state_dir, Path::new("/var/lib/enforcer"));
    assert_eq!(cfg.pin_dir, Path::new("/sys/fs/bpf/enforcer"));
    // policy.d next to the config file; relative policy_dir resolves against it too.
    assert_eq!(cfg.policy_dir.as_deref(), Some(Path::new("/etc/enforcer/policy.d")));
    let cfg = load_str("/opt/e/enforcer.toml", "policy_dir = \"rules\"").unwrap();
    assert_eq!(cfg.policy_dir.as_deref(), Some(Path::new("/opt/e/rules")));
    assert!(cfg.secrets.is_empty() && cfg.intents.is_empty() && cfg.agents.is_empty());

    let cfg = load_str(
        "t.toml",
        "[[secret]]\nname = \"s\"\npaths = [\"/s\"]\n[[intent]]\nname = \"i\"\n",
    )
    .unwrap();
    assert_eq!(cfg.secrets[0].kind, SecretKind::CredentialsFile);
    let i = &cfg.intents[0];
    assert_eq!((i.max_ttl, i.default_ttl), (DEFAULT_MAX_TTL, DEFAULT_TTL));
    assert_eq!(i.on_violation, OnViolation::Alert);
    assert!(!i.revoke_on_violation);

    // default_ttl defaults to min(5m, max_ttl).
    let cfg = load_str("t.toml", "[[intent]]\nname = \"i\"\nmax_ttl = \"2m\"\n").unwrap();
    assert_eq!(cfg.intents[0].default_ttl, Duration::from_secs(120));
}

#[test]
fn embedded_default_has_the_catalog() {
    let cfg = load_str(EMBEDDED_SOURCE, DEFAULT_TOML).unwrap();
    assert_eq!(cfg.mode, Mode::Monitor);
    assert_eq!(cfg.source, "embedded default");
    assert_eq!(cfg.policy_dir, None);
    assert!(cfg.intents.is_empty());
    let has = |name: &str, kind: SecretKind, path: &str| {
        let s = cfg.secret(name).unwrap_or_else(|| panic!("catalog lacks {name}"));
        assert_eq!(s.kind, kind, "{name}");
        assert!(s.paths.iter().any(|p| p == path), "{name} lacks {path}");
    };
    use SecretKind::*;
    has("aws-credentials", CredentialsFile, "~/.aws/credentials");
    has("aws-credentials", CredentialsFile, "~/.aws/config");
    has(
        "gcp-credentials",
        CredentialsFile,
        "~/.config/gcloud/application_default_credentials.json",
    );
    has("gcp-credentials", CredentialsFile, "~/.config/gcloud/legacy_credentials/*/adc.json");
    has("azure-credentials", CredentialsFile, "~/.azure/msal_token_cache.json");
    has("kubeconfig", CredentialsFile, "~/.kube/config");
    has("kubeconfig", CredentialsFile, "/etc/kubernetes/admin.conf");
    has("k8s-service-account-token", Token, "/var/run/secrets/kubernetes.io/serviceaccount/token");
    has("k8s-service-account-token", Token, "/run/secrets/kubernetes.io/serviceaccount/token");
    has("docker-config", CredentialsFile, "~/.docker/config.json");
    has("npm-credentials", CredentialsFile, "~/.npmrc");
    has("pypi-credentials", CredentialsFile, "~/.pypirc");
    has("git-credentials", CredentialsFile, "~/.git-credentials");
    has("git-credentials", CredentialsFile, "~/.config/git/credentials");
    has("netrc", CredentialsFile, "~/.netrc");
    has("ssh-private-keys", PrivateKey, "~/.ssh/id_ed25519");
    has("ssh-private-keys", PrivateKey, "/etc/ssh/ssh_host_*_key");
    has("github-cli", CredentialsFile, "~/.config/gh/hosts.yml");
    has("vault-token", Token, "~/.vault-token");
    has("mcp-client-configs", CredentialsFile, "~/.cursor/mcp.json");
    has("mcp-client-configs", CredentialsFile, "~/.claude.json");
    has("mcp-client-configs", CredentialsFile, "~/.codeium/windsurf/mcp_config.json");
    has("terraform-credentials", CredentialsFile, "~/.terraform.d/credentials.tfrc.json");
    for s in &cfg.secrets {
        assert!(
            s.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{}",
            s.name
        );
    }
}

#[test]
fn load_missing_file_is_an_error() {
    let d = load(Some(Path::new("/nonexistent/enforcer.toml"))).unwrap_err();
    assert_eq!(d.0.len(), 1);
    assert!(d.to_string().starts_with("/nonexistent/enforcer.toml:1:1: cannot read file"), "{d}");
}

#[test]
fn diagnostics_display() {
    let d = Diagnostics(vec![
        Diagnostic { file: "a.toml".into(), line: 3, col: 7, message: "bad".into() },
        Diagnostic { file: "b.toml".into(), line: 1, col: 1, message: "worse".into() },
    ]);
    assert_eq!(d.0[0].to_string(), "a.toml:3:7: bad");
    assert_eq!(d.to_string(), "a.toml:3:7: bad\nb.toml:1:1: worse");
    let _: &dyn std::error::Error = &d;
}

// --- one test per error class, each pinning the exact position --------------------------------

#[test]
fn toml_syntax_error() {
    assert_error("mode = \"monitor\"\nhost = \"x\n", "2:10", "");
    assert_error("[[secret]\nname = \"a\"\n", "1:10", "expected `]`");
    assert_error("mode = \"monitor\"\nmode = \"enforce\"\n", "2:1", "duplicate key");
}

#[test]
fn unknown_keys() {
    assert_error("mode = \"monitor\"\nverbose = true\n", "2:1", "unknown field `verbose`");
    assert_error(
        "[[secret]]\nname = \"a\"\npaths = [\"/a\"]\npath = \"/b\"\n",
        "4:1",
        "unknown field `path`",
    );
    assert_error(
        "[[intent]]\nname = \"i\"\nagents = [{ exe = \"/x\", user = 3 }]\n",
        "3:25",
        "unknown field `user`",
    );
}

#[test]
fn wrong_types() {
    assert_error("mode = 5\n", "1:8", "invalid type");
    assert_error("[[secret]]\nname = \"a\"\npaths = \"/a\"\n", "3:9", "invalid type");
    assert_error("[[agent]]\nuid = \"root\"\n", "2:7", "invalid type");
    assert_error("[[agent]]\nuid = -1\n", "2:7", "");
    assert_error(
        "[[intent]]\nname = \"i\"\nrevoke_on_violation = \"yes\"\n",
        "3:23",
        "invalid type",
    );
    assert_error("[[secret]]\npaths = [\"/a\"]\n", "1:1", "missing field `name`");
}

#[test]
fn bad_values_point_at_the_value() {
    assert_error(
        "mode = \"enforcing\"\n",
        "1:8",
        "invalid mode `enforcing`: expected one of `monitor`, `enforce`",
    );
    assert_error(
        "[[intent]]\nname = \"i\"\ndestinations = [\"192.0.2.1:443\", \"192.0.2.1:0\"]\n",
        "3:34",
        "invalid destination `192.0.2.1:0`: port 0",
    );
    assert_error("[[intent]]\nname = \"i\"\nmax_ttl = \"soon\"\n", "3:11", "invalid max_ttl");
    assert_error("[[intent]]\nname = \"i\"\ndefault_ttl = \"0s\"\n", "3:15", "greater than zero");
    assert_error(
        "[[intent]]\nname = \"i\"\non_violation = \"block\"\n",
        "3:16",
        "invalid on_violation `block`",
    );
    assert_error(
        "[[secret]]\nname = \"a\"\npaths = [\"/a\"]\nkind = \"password\"\n",
        "4:8",
        "invalid kind `password`",
    );
    assert_error(
        "[[secret]]\nname = \"a\"\npaths = [\"/a\", \"a/b\"]\n",
        "3:16",
        "must be absolute or start with `~/`",
    );
    assert_error("[[secret]]\nname = \"a\"\npaths = [\"/a/[b\"]\n", "3:10", "invalid glob pattern");
    assert_error("[[secret]]\nname = \"a\"\npaths = []\n", "2:8", "secret `a` has no paths");
    assert_error(
        "[[secret]]\nname = \"a b\"\npaths = [\"/a\"]\n",
        "2:8",
        "invalid secret name `a b`",
    );
    assert_error("runtime_dir = \"run\"\n", "1:15", "runtime_dir `run` must be an absolute path");
    assert_error("[[agent]]\nexe_sha256 = \"abc\"\n", "2:14", "64 hexadecimal");
    assert_error("[[agent]]\nexe = \"python3\"\n", "2:7", "exe `python3` must be an absolute path");
}

#[test]
fn undefined_secret() {
    let text = "[[secret]]\nname = \"a\"\npaths = [\"/a\"]\n[[intent]]\nname = \"i\"\nsecrets = [\"a\", \"b\"]\n";
    assert_error(text, "6:17", "intent `i` names undefined secret `b`");
}

#[test]
fn duplicate_names() {
    let text =
        "[[secret]]\nname = \"a\"\npaths = [\"/a\"]\n[[secret]]\nname = \"a\"\npaths = [\"/b\"]\n";
    assert_error(text, "5:8", "duplicate secret `a` (first defined at t.toml:2:8)");
    let text = "[[intent]]\nname = \"i\"\n[[intent]]\n  name = \"i\"\n";
    assert_error(text, "4:10", "duplicate intent `i` (first defined at t.toml:2:8)");
}

#[test]
fn empty_agent_selector() {
    assert_error(
        "[[intent]]\nname = \"i\"\nagents = [{ uid = 0 }, {}]\n",
        "3:24",
        "empty agent selector",
    );
    assert_error("mode = \"monitor\"\n\n[[agent]]\n", "3:1", "empty agent selector");
}

#[test]
fn default_ttl_above_max_ttl() {
    let text = "[[intent]]\nname = \"i\"\nmax_ttl = \"10m\"\ndefault_ttl = \"1h\"\n";
    assert_error(text, "4:15", "default_ttl 1h is longer than max_ttl 10m");
    // Against the default max_ttl (15m) too.
    assert_error(
        "[[intent]]\nname = \"i\"\ndefault_ttl = \"20m\"\n",
        "3:15",
        "longer than max_ttl 15m",
    );
}

#[test]
fn all_semantic_errors_are_reported_in_order() {
    let text = r#"mode = "strict"
[[secret]]
name = "a"
paths = ["/a"]
[[secret]]
name = "a"
paths = ["/b"]
destinations = ["10.0.0.1/8:443"]
[[intent]]
name = "i"
secrets = ["nope"]
max_ttl = "1m"
default_ttl = "2m"
agents = [{}]
on_violation = "explode"
"#;
    let errs = errors(text);
    assert_eq!(
        errs,
        [
            "t.toml:1:8: invalid mode `strict`: expected one of `monitor`, `enforce`",
            "t.toml:6:8: duplicate secret `a` (first defined at t.toml:3:8)",
            "t.toml:8:17: invalid destination `10.0.0.1/8:443`: `10.0.0.1/8` has host bits set; the network is `10.0.0.0/8`",
            "t.toml:11:12: intent `i` names undefined secret `nope`",
            "t.toml:13:15: default_ttl 2m is longer than max_ttl 1m",
            "t.toml:14:11: empty agent selector: give at least one of `exe`, `exe_sha256`, `cgroup`, `uid`",
            "t.toml:15:16: invalid on_violation `explode`: expected one of `alert`, `deny`, `kill`",
        ]
    );
}

// --- several files ------------------------------------------------------------------------------

#[test]
fn policy_dir_is_merged() {
    let dir = TempDir::new("merge");
    let cfg_path = dir.write(
        "enforcer.toml",
        "mode = \"enforce\"\n[[secret]]\nname = \"base\"\npaths = [\"/base\"]\n",
    );
    // Sorted by name; names resolve across files in either direction.
    dir.write(
        "policy.d/20-intents.toml",
        "[[intent]]\nname = \"deploy\"\nsecrets = [\"base\", \"extra\"]\n",
    );
    dir.write(
        "policy.d/10-secrets.toml",
        "[[secret]]\nname = \"extra\"\npaths = [\"/extra\"]\n[[agent]]\nuid = 7\n",
    );
    dir.write("policy.d/README.md", "not policy");
    dir.write("policy.d/.#20-intents.toml", "garbage = [");
    let cfg = load(Some(&cfg_path)).unwrap();
    assert_eq!(cfg.mode, Mode::Enforce);
    assert_eq!(cfg.policy_dir, Some(dir.0.join("policy.d")));
    assert_eq!(cfg.source, cfg_path.display().to_string());
    let names: Vec<&str> = cfg.secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["base", "extra"]);
    assert_eq!(cfg.intents[0].secrets, ["base", "extra"]);
    assert_eq!(cfg.agents, [AgentSelector { uid: Some(7), ..Default::default() }]);

    // A fragment may not carry settings, and errors name the fragment file.
    let bad = dir.write(
        "policy.d/30-bad.toml",
        "[[secret]]\nname = \"base\"\npaths = [\"/again\"]\n\nmode = \"monitor\"\n",
    );
    let d = load(Some(&cfg_path)).unwrap_err();
    assert_eq!(d.0.len(), 1, "{d}");
    assert_eq!(d.0[0].file, bad.display().to_string());
    assert_eq!((d.0[0].line, d.0[0].col), (5, 1));
    assert!(d.0[0].message.contains("unknown field `mode`"), "{d}");
    assert!(d.0[0].message.contains("may hold only [[secret]], [[intent]] and [[agent]]"), "{d}");

    // Once it parses, the duplicate is reported in the fragment, pointing back at the config.
    fs::write(&bad, "[[secret]]\nname = \"base\"\npaths = [\"/again\"]\n").unwrap();
    let d = load(Some(&cfg_path)).unwrap_err();
    assert_eq!(
        d.to_string(),
        format!(
            "{}:2:8: duplicate secret `base` (first defined at {}:3:8)",
            bad.display(),
            cfg_path.display()
        )
    );
}

#[test]
fn syntax_error_in_one_file_suppresses_only_reference_errors() {
    let dir = TempDir::new("partial");
    let a = dir.write("a.toml", "[[secret]\nname = \"s\"\n");
    let b = dir.write("b.toml", "[[intent]]\nname = \"i\"\nsecrets = [\"s\"]\nmax_ttl = \"x\"\n");
    let d = check_files(&[a.clone(), b.clone()]).unwrap_err();
    let lines: Vec<String> =
        d.0.iter().map(|d| format!("{}:{}:{}", d.file, d.line, d.col)).collect();
    // The syntax error and b's own bad value; not "undefined secret s", which may live in a.
    assert_eq!(lines, [format!("{}:1:10", a.display()), format!("{}:4:11", b.display())]);
}

#[test]
fn check_files_resolves_across_the_set() {
    let dir = TempDir::new("check");
    let cfg = dir.write("enforcer.toml", "mode = \"enforce\"\n");
    let secrets = dir.write("secrets.toml", "[[secret]]\nname = \"k\"\npaths = [\"~/.k\"]\n");
    let intents = dir.write("intents.toml", "[[intent]]\nname = \"i\"\nsecrets = [\"k\"]\n");
    let ok = check_files(&[cfg.clone(), secrets.clone(), intents.clone()]).unwrap();
    assert_eq!((ok.mode, ok.secrets.len(), ok.intents.len()), (Mode::Enforce, 1, 1));

    // A single fragment alone is valid; alone, the intent's reference is undefined.
    assert_eq!(check_files(std::slice::from_ref(&secrets)).unwrap().secrets.len(), 1);
    let d = check_files(std::slice::from_ref(&intents)).unwrap_err();
    assert_eq!(
        d.to_string(),
        format!("{}:3:12: intent `i` names undefined secret `k`", intents.display())
    );

    // Settings are only allowed in the first file.
    let d = check_files(&[secrets.clone(), cfg.clone()]).unwrap_err();
    assert_eq!((d.0[0].file.as_str(), d.0[0].line, d.0[0].col), (cfg.to_str().unwrap(), 1, 1));

    // A directory stands for its *.toml files, all fragments.
    let pd = TempDir::new("check-dir");
    pd.write("a.toml", "[[secret]]\nname = \"k\"\npaths = [\"/k\"]\n");
    pd.write("b.toml", "[[intent]]\nname = \"i\"\nsecrets = [\"k\"]\n");
    let ok = check_files(std::slice::from_ref(&pd.0)).unwrap();
    assert_eq!((ok.secrets.len(), ok.intents.len()), (1, 1));

    let d = check_files(&[dir.0.join("missing.toml")]).unwrap_err();
    assert!(d.0[0].message.starts_with("cannot read file"), "{d}");
}

// --- paths ------------------------------------------------------------------------------------

#[test]
fn expand_paths_globs_the_filesystem() {
    let dir = TempDir::new("expand");
    dir.write("keys/ssh_host_rsa_key", "");
    dir.write("keys/ssh_host_ed25519_key", "");
    dir.write("keys/ssh_host_rsa_key.pub", "");
    fs::create_dir_all(dir.0.join("keys/ssh_host_dir_key")).unwrap();
    let root = dir.0.display();
    let secret = Secret {
        name: "k".into(),
        paths: vec![
            format!("{root}/keys/ssh_host_*_key"),
            format!("{root}/keys/ssh_host_rsa_key"), // also matched by the glob: deduplicated
            format!("{root}/missing/literal"),       // kept although it does not exist
            format!("{root}/nomatch/*.json"),        // a glob without matches yields nothing
        ],
        destinations: vec![],
        kind: SecretKind::PrivateKey,
        value_file: None,
    };
    assert_eq!(
        secret.expand_paths(),
        [
            dir.0.join("keys/ssh_host_ed25519_key"),
            dir.0.join("keys/ssh_host_rsa_key"),
            dir.0.join("missing/literal"),
        ]
    );
}

#[test]
fn expand_paths_expands_home() {
    let dir = TempDir::new("homes");
    let alice = dir.0.join("home/alice");
    let odd = dir.0.join("home/b[o]b"); // glob characters in a home are taken literally
    dir.write("home/alice/.config/gcloud/legacy_credentials/a@x/adc.json", "");
    dir.write("home/alice/.config/gcloud/legacy_credentials/b@x/adc.json", "");
    dir.write("home/b[o]b/.config/gcloud/legacy_credentials/c@x/adc.json", "");
    let homes = [alice.clone(), odd.clone()];
    let patterns = [
        "~/.aws/credentials".to_string(),
        "~/.config/gcloud/legacy_credentials/*/adc.json".to_string(),
    ];
    assert_eq!(
        expand_paths_with_homes(&patterns, &homes),
        [
            alice.join(".aws/credentials"),
            alice.join(".config/gcloud/legacy_credentials/a@x/adc.json"),
            alice.join(".config/gcloud/legacy_credentials/b@x/adc.json"),
            odd.join(".aws/credentials"),
            odd.join(".config/gcloud/legacy_credentials/c@x/adc.json"),
        ]
    );
    // The real thing always covers root.
    let s = Secret {
        name: "a".into(),
        paths: vec!["~/.aws/credentials".into()],
        destinations: vec![],
        kind: SecretKind::CredentialsFile,
        value_file: None,
    };
    assert!(s.expand_paths().contains(&PathBuf::from("/root/.aws/credentials")));
}

#[test]
fn agent_selector_matching() {
    let sel = AgentSelector {
        exe: Some("/usr/bin/python3".into()),
        cgroup: Some("/ci/job".into()),
        ..Default::default()
    };
    let no_hash = || -> Option<String> { panic!("hash not needed") };
    assert!(sel.matches(Path::new("/usr/bin/python3"), 0, "/ci/job", no_hash));
    assert!(sel.matches(Path::new("/usr/bin/python3"), 0, "/ci/job/step-1", no_hash));
    assert!(!sel.matches(Path::new("/usr/bin/python3"), 0, "/ci/jobber", no_hash));
    assert!(!sel.matches(Path::new("/usr/bin/perl"), 0, "/ci/job", no_hash));
    let h = "ab".repeat(32);
    let sel = AgentSelector { exe_sha256: Some(h.clone()), ..Default::default() };
    assert!(sel.matches(Path::new("/x"), 1, "/", || Some(h.to_uppercase())));
    assert!(!sel.matches(Path::new("/x"), 1, "/", || None));
}

/// A destination list that does not fit the kernel's form (more port ranges for one network,
/// after merging the networks containing it, than an entry holds) is refused at its position,
/// not at a grant's issue or a reload.
#[test]
fn destinations_that_do_not_fit_the_kernel_are_refused_where_written() {
    let ports: Vec<String> = (0..9).map(|i| format!("\"10.0.0.0/8:{}\"", 1000 + 10 * i)).collect();
    let text = format!(
        "[[intent]]\nname = \"i\"\ndestinations = [\"10.1.0.0/16:22\", {}]\n",
        ports.join(", ")
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("t.toml:3:"), "{errs:?}");
    assert!(errs[0].contains("port ranges"), "{errs:?}");
    // Eight ranges on one network fit.
    let eight = format!("[[intent]]\nname = \"i\"\ndestinations = [{}]\n", ports[..8].join(", "));
    assert!(load_str("t.toml", &eight).is_ok());
}

#[test]
fn file_backend_key() {
    assert_eq!(load_str("t.toml", "").unwrap().file_backend, FileBackend::Auto);
    for (text, want) in [
        ("auto", FileBackend::Auto),
        ("bpf-lsm", FileBackend::BpfLsm),
        ("fanotify", FileBackend::Fanotify),
    ] {
        let cfg = load_str("t.toml", &format!("file_backend = \"{text}\"\n")).unwrap();
        assert_eq!(cfg.file_backend, want);
        assert_eq!(want.to_string(), text);
    }
    assert_error(
        "mode = \"monitor\"\nfile_backend = \"lsm\"\n",
        "2:16",
        "invalid file_backend `lsm`: expected one of `auto`, `bpf-lsm`, `fanotify`",
    );
    assert_error("file_backend = 1\n", "1:16", "invalid type");
}

#[test]
fn dns_section() {
    let cfg = load_str(
        "t.toml",
        "[dns]\nupstream = [\"10.0.0.2:53\", \"[2001:db8::53]:5353\"]\nmin_ttl = \"30s\"\nrefuse = \"nxdomain\"\nlisten = \"127.0.0.1:5300\"\n",
    )
    .unwrap();
    assert_eq!(
        cfg.dns.upstream,
        Some(vec!["10.0.0.2:53".parse().unwrap(), "[2001:db8::53]:5353".parse().unwrap()])
    );
    assert_eq!((cfg.dns.min_ttl, cfg.dns.refuse), (Duration::from_secs(30), Refuse::Nxdomain));
    assert_eq!(cfg.dns.listen, "127.0.0.1:5300".parse().unwrap());
    assert_eq!(cfg.dns.nss_resolve, crate::policy::NssResolve::Fallback);
    let d = load_str("t.toml", "").unwrap().dns;
    assert_eq!((d.upstream, d.min_ttl, d.refuse), (None, DEFAULT_MIN_TTL, Refuse::Refused));
    let d = load_str("t.toml", "[dns]\nnss_resolve = \"allow\"\n").unwrap().dns;
    assert_eq!(d.nss_resolve, crate::policy::NssResolve::Allow);
    assert_error("[dns]\nnss_resolve = \"deny\"\n", "2:15", "dns nss_resolve `deny` is not one of");
    assert_error("[dns]\nupstream = [\"10.0.0.2\"]\n", "2:13", "not an `IP:port` address");
    assert_error("[dns]\nrefuse = \"drop\"\n", "2:10", "not one of");
    assert_error("[dns]\nmin_ttl = \"soon\"\n", "2:11", "dns min_ttl");
    assert_error("[dns]\nlisten = \"0.0.0.0:53\"\n", "2:10", "must be 127.0.0.1:PORT");
    assert_error("[dns]\nports = 1\n", "2:1", "unknown field");
}
