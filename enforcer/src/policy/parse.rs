//! TOML -> `Config`, in two phases:
//! 1. serde into `Raw*` structs that keep every value's byte span (`Spanned`) and reject unknown
//!    keys; serde stops at the first syntax/type error, so this yields at most one error per file.
//! 2. Checks by hand, which keep going after an error so one run reports every problem.
//!
//! Enumerations (`mode`, `kind`, `on_violation`), destinations and durations are read as strings
//! and converted in phase 2, so a bad value is reported at its position along with all the others.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_spanned::Spanned;

use super::destination::Destination;
use super::diag::{Collector, Diagnostics};
use super::duration::{format_duration, parse_duration};
use super::model::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mode: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    cgroup_root: Option<Spanned<String>>,
    runtime_dir: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    pin_dir: Option<Spanned<String>>,
    policy_dir: Option<Spanned<String>>,
    socket_group: Option<Spanned<String>>,
    mint_rate_per_second: Option<Spanned<u32>>,
    file_backend: Option<Spanned<String>>,
    // Repeated rather than `#[serde(flatten)]`ed from RawPolicy: flatten buffers values and loses
    // their spans, and does not combine with deny_unknown_fields.
    #[serde(default)]
    secret: Vec<Spanned<RawSecret>>,
    #[serde(default)]
    intent: Vec<Spanned<RawIntent>>,
    #[serde(default)]
    agent: Vec<Spanned<RawAgent>>,
    /// Alert sinks and outbox bounds: daemon settings, so never in policy.d fragments.
    #[serde(default)]
    sink: Vec<Spanned<super::sink::RawSink>>,
    outbox: Option<super::sink::RawOutbox>,
    aws: Option<super::aws::RawAws>,
    /// Workload identity (`[spiffe]`): a daemon setting, so never in policy.d fragments.
    spiffe: Option<super::spiffe::RawSpiffe>,
    limits: Option<super::limits::RawLimits>,

    dns: Option<super::dns::RawDns>,
}

/// A policy.d file: only policy tables, never daemon settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    secret: Vec<Spanned<RawSecret>>,
    #[serde(default)]
    intent: Vec<Spanned<RawIntent>>,
    #[serde(default)]
    agent: Vec<Spanned<RawAgent>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    name: Spanned<String>,
    #[serde(default)]
    paths: Vec<Spanned<String>>,
    #[serde(default)]
    destinations: Vec<Spanned<String>>,
    kind: Option<Spanned<String>>,
    value_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntent {
    name: Spanned<String>,
    #[serde(default)]
    agents: Vec<Spanned<RawAgent>>,
    #[serde(default)]
    secrets: Vec<Spanned<String>>,
    #[serde(default)]
    destinations: Vec<Spanned<String>>,
    max_ttl: Option<Spanned<String>>,
    default_ttl: Option<Spanned<String>>,
    on_violation: Option<Spanned<String>>,
    revoke_on_violation: Option<bool>,
    aws: Option<super::aws::RawIntentAws>,
    #[serde(default)]
    audiences: Vec<Spanned<String>>,
    spiffe_id: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    exe: Option<Spanned<String>>,
    exe_sha256: Option<Spanned<String>>,
    cgroup: Option<Spanned<String>>,
    uid: Option<u32>,
}

/// Where the config text came from; decides the default policy_dir.
pub(crate) enum Origin<'a> {
    Embedded,
    File(&'a Path),
}

/// Daemon settings: everything in `Config` except the policy tables.
pub(crate) struct Settings {
    mode: Mode,
    host: Option<String>,
    cgroup_root: Option<PathBuf>,
    runtime_dir: PathBuf,
    state_dir: PathBuf,
    pin_dir: PathBuf,
    pub policy_dir: Option<PathBuf>,
    socket_group: Option<String>,
    mint_rate_per_second: u32,
    file_backend: FileBackend,
    sinks: Vec<super::sink::SinkConfig>,
    outbox: super::sink::OutboxConfig,
    aws: super::aws::AwsSettings,
    spiffe: Option<super::spiffe::SpiffeConfig>,
    limits: super::limits::Limits,

    dns: super::dns::DnsConfig,
}

impl Settings {
    pub fn defaults(policy_dir: Option<PathBuf>) -> Self {
        Settings {
            mode: Mode::default(),
            host: None,
            cgroup_root: None,
            runtime_dir: DEFAULT_RUNTIME_DIR.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            pin_dir: DEFAULT_PIN_DIR.into(),
            policy_dir,
            socket_group: None,
            mint_rate_per_second: DEFAULT_MINT_RATE_PER_SECOND,
            file_backend: FileBackend::Auto,
            sinks: Vec::new(),
            outbox: Default::default(),
            aws: Default::default(),
            spiffe: None,
            limits: Default::default(),

            dns: Default::default(),
        }
    }
}

/// A definition and where its name was written, for duplicate and reference checks.
struct Def<T> {
    value: T,
    file: usize,
    name_span: Range<usize>,
}

/// Accumulates definitions from any number of files; `finish` runs the cross-file checks.
#[derive(Default)]
pub(crate) struct Loader {
    diags: Collector,
    secrets: Vec<Def<Secret>>,
    /// With the span of each entry of `Intent::secrets`, for undefined-name errors.
    intents: Vec<(Def<Intent>, Vec<Range<usize>>)>,
    agents: Vec<AgentSelector>,
    /// Trust domains written in full `spiffe_id` templates (file, span, domain): each must be
    /// `[spiffe] trust_domain`.
    spiffe_domains: Vec<(usize, Range<usize>, String)>,
    /// A file could not be read or parsed, so names it defines are unknown: undefined-reference
    /// errors would be noise and are not reported.
    incomplete: bool,
}

impl Loader {
    /// Parses a full config file (a policy-only file is a valid config too).
    pub fn config(&mut self, name: String, text: String, origin: Origin<'_>) -> Option<Settings> {
        let file = self.diags.add_source(name, text);
        let raw: RawConfig = self.deserialize(file, false)?;
        let settings = self.settings(file, &raw, origin);
        self.policy(file, RawPolicy { secret: raw.secret, intent: raw.intent, agent: raw.agent });
        Some(settings)
    }

    /// Parses a policy fragment: only [[secret]], [[intent]] and [[agent]].
    pub fn fragment(&mut self, name: String, text: String) {
        let file = self.diags.add_source(name, text);
        if let Some(raw) = self.deserialize(file, true) {
            self.policy(file, raw);
        }
    }

    /// A file that could not be read: reported at its first line.
    pub fn unreadable(&mut self, name: String, err: &std::io::Error) {
        let file = self.diags.add_source(name, String::new());
        self.diags.error(file, 0..0, format!("cannot read file: {err}"));
        self.incomplete = true;
    }

    fn deserialize<T: serde::de::DeserializeOwned>(
        &mut self,
        file: usize,
        fragment: bool,
    ) -> Option<T> {
        match toml::from_str::<T>(&self.diags.sources[file].text) {
            Ok(v) => Some(v),
            Err(e) => {
                // One diagnostic per line: fold any multi-line message.
                let mut msg = e.message().trim().replace('\n', "; ");
                if fragment && msg.starts_with("unknown field") {
                    msg.push_str(
                        " (policy files may hold only [[secret]], [[intent]] and [[agent]])",
                    );
                }
                self.diags.error(file, e.span().unwrap_or(0..0), msg);
                self.incomplete = true;
                None
            }
        }
    }

    fn settings(&mut self, file: usize, raw: &RawConfig, origin: Origin<'_>) -> Settings {
        let mode = self.choice(
            file,
            "mode",
            raw.mode.as_ref(),
            &[("monitor", Mode::Monitor), ("enforce", Mode::Enforce)],
        );
        let file_backend = self.choice(
            file,
            "file_backend",
            raw.file_backend.as_ref(),
            &[
                ("auto", FileBackend::Auto),
                ("bpf-lsm", FileBackend::BpfLsm),
                ("fanotify", FileBackend::Fanotify),
            ],
        );
        let config_dir = match origin {
            Origin::File(p) => Some(p.parent().unwrap_or(Path::new(""))),
            Origin::Embedded => None,
        };
        let policy_dir = match (&raw.policy_dir, config_dir) {
            // Relative to the config file, like `policy.d` itself, not to the daemon's cwd.
            (Some(p), dir) => {
                self.non_empty(file, "policy_dir", p).map(|p| dir.unwrap_or(Path::new("")).join(p))
            }
            (None, Some(dir)) => Some(dir.join("policy.d")),
            (None, None) => None,
        };
        let defaults = Settings::defaults(policy_dir);
        Settings {
            mode: mode.unwrap_or_default(),
            host: raw
                .host
                .as_ref()
                .and_then(|h| self.non_empty(file, "host", h))
                .map(str::to_owned),
            cgroup_root: raw
                .cgroup_root
                .as_ref()
                .and_then(|p| self.absolute(file, "cgroup_root", p)),
            runtime_dir: raw
                .runtime_dir
                .as_ref()
                .and_then(|p| self.absolute(file, "runtime_dir", p))
                .unwrap_or(defaults.runtime_dir),
            state_dir: raw
                .state_dir
                .as_ref()
                .and_then(|p| self.absolute(file, "state_dir", p))
                .unwrap_or(defaults.state_dir),
            pin_dir: raw
                .pin_dir
                .as_ref()
                .and_then(|p| self.absolute(file, "pin_dir", p))
                .unwrap_or(defaults.pin_dir),
            policy_dir: defaults.policy_dir,
            socket_group: raw
                .socket_group
                .as_ref()
                .and_then(|g| self.non_empty(file, "socket_group", g))
                .map(str::to_owned),
            mint_rate_per_second: raw
                .mint_rate_per_second
                .as_ref()
                .map(|r| *r.get_ref())
                .unwrap_or(defaults.mint_rate_per_second),
            file_backend: file_backend.unwrap_or(defaults.file_backend),
            sinks: super::sink::sinks(&mut self.diags, file, &raw.sink),
            outbox: super::sink::outbox(&mut self.diags, file, raw.outbox.as_ref()),
            aws: super::aws::settings(&mut self.diags, file, raw.aws.as_ref()),
            spiffe: raw
                .spiffe
                .as_ref()
                .and_then(|r| super::spiffe::spiffe(&mut self.diags, file, r)),
            limits: super::limits::limits(&mut self.diags, file, raw.limits.as_ref()),

            dns: super::dns::dns(&mut self.diags, file, raw.dns.as_ref()),
        }
    }

    fn policy(&mut self, file: usize, raw: RawPolicy) {
        for s in raw.secret {
            self.secret(file, s.into_inner());
        }
        for i in raw.intent {
            self.intent(file, i.into_inner());
        }
        for a in raw.agent {
            if let Some(a) = self.agent(file, a) {
                self.agents.push(a);
            }
        }
    }

    fn secret(&mut self, file: usize, raw: RawSecret) {
        let name = self.name(file, "secret", &raw.name);
        let value_file = raw.value_file.as_ref().and_then(|p| self.absolute(file, "value_file", p));
        // A daemon-held secret need not sit anywhere else.
        if raw.paths.is_empty() && raw.value_file.is_none() {
            self.diags.error(file, raw.name.span(), format!("secret `{name}` has no paths"));
        }
        let mut paths = Vec::new();
        for p in &raw.paths {
            let s = p.get_ref();
            if !(s.starts_with('/') || s.starts_with("~/")) {
                self.diags.error(
                    file,
                    p.span(),
                    format!("secret path `{s}` must be absolute or start with `~/`"),
                );
            } else if let Err(e) = glob::Pattern::new(s) {
                self.diags.error(file, p.span(), format!("invalid glob pattern `{s}`: {}", e.msg));
            } else {
                paths.push(s.clone());
            }
        }
        let secret = Secret {
            name: name.clone(),
            paths,
            destinations: self.destinations(file, &raw.destinations),
            kind: self
                .choice(
                    file,
                    "kind",
                    raw.kind.as_ref(),
                    &[
                        ("credentials_file", SecretKind::CredentialsFile),
                        ("private_key", SecretKind::PrivateKey),
                        ("token", SecretKind::Token),
                    ],
                )
                .unwrap_or_default(),
            value_file,
        };
        self.secrets.push(Def { value: secret, file, name_span: raw.name.span() });
    }

    fn intent(&mut self, file: usize, raw: RawIntent) {
        let name = self.name(file, "intent", &raw.name);
        let agents = raw.agents.into_iter().filter_map(|a| self.agent(file, a)).collect();
        let max_ttl = raw
            .max_ttl
            .as_ref()
            .and_then(|d| self.duration(file, "max_ttl", d))
            .unwrap_or(DEFAULT_MAX_TTL);
        let default_ttl = match &raw.default_ttl {
            Some(d) => match self.duration(file, "default_ttl", d) {
                Some(ttl) if ttl > max_ttl => {
                    let msg = format!(
                        "default_ttl {} is longer than max_ttl {}",
                        format_duration(ttl),
                        format_duration(max_ttl)
                    );
                    self.diags.error(file, d.span(), msg);
                    max_ttl
                }
                Some(ttl) => ttl,
                None => max_ttl,
            },
            None => DEFAULT_TTL.min(max_ttl),
        };
        let on_violation = self.choice(
            file,
            "on_violation",
            raw.on_violation.as_ref(),
            &[
                ("alert", OnViolation::Alert),
                ("deny", OnViolation::Deny),
                ("kill", OnViolation::Kill),
            ],
        );
        let intent = Intent {
            name: name.clone(),
            agents,
            secrets: raw.secrets.iter().map(|s| s.get_ref().clone()).collect(),
            destinations: self.destinations(file, &raw.destinations),
            max_ttl,
            default_ttl,
            on_violation: on_violation.unwrap_or_default(),
            revoke_on_violation: raw.revoke_on_violation.unwrap_or(false),
            aws: raw.aws.as_ref().and_then(|a| super::aws::intent(&mut self.diags, file, &name, a)),
            audiences: super::spiffe::audiences(&mut self.diags, file, &raw.audiences),
            spiffe_id: raw.spiffe_id.as_ref().and_then(|t| {
                let domain = super::spiffe::check_template(&mut self.diags, file, t)?;
                if let Some(d) = domain {
                    self.spiffe_domains.push((file, t.span(), d));
                }
                Some(t.get_ref().clone())
            }),
        };
        let refs = raw.secrets.iter().map(Spanned::span).collect();
        self.intents.push((Def { value: intent, file, name_span: raw.name.span() }, refs));
    }

    fn agent(&mut self, file: usize, raw: Spanned<RawAgent>) -> Option<AgentSelector> {
        let span = raw.span();
        let raw = raw.into_inner();
        let errors_before = self.diags.error_count();
        let exe = raw.exe.as_ref().and_then(|p| self.absolute(file, "exe", p));
        let exe_sha256 = raw.exe_sha256.as_ref().and_then(|h| {
            let s = h.get_ref();
            if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                Some(s.to_ascii_lowercase())
            } else {
                self.diags.error(
                    file,
                    h.span(),
                    format!("exe_sha256 `{s}` must be 64 hexadecimal characters"),
                );
                None
            }
        });
        let cgroup =
            raw.cgroup.as_ref().and_then(|c| self.non_empty(file, "cgroup", c)).map(str::to_owned);
        let selector = AgentSelector { exe, exe_sha256, cgroup, uid: raw.uid };
        if raw.exe.is_none()
            && raw.exe_sha256.is_none()
            && raw.cgroup.is_none()
            && raw.uid.is_none()
        {
            // An empty selector would match every process on the host.
            self.diags.error(
                file,
                span,
                "empty agent selector: give at least one of `exe`, `exe_sha256`, `cgroup`, `uid`",
            );
        }
        (self.diags.error_count() == errors_before).then_some(selector)
    }

    /// Names appear in events, CLI arguments and API paths: keep them plain.
    fn name(&mut self, file: usize, what: &str, name: &Spanned<String>) -> String {
        let s = name.get_ref();
        let ok = s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.diags.error(
                file,
                name.span(),
                format!("invalid {what} name `{s}`: use letters, digits, `-`, `_` and `.`, starting with a letter or digit"),
            );
        }
        s.clone()
    }

    fn destinations(&mut self, file: usize, raw: &[Spanned<String>]) -> Vec<Destination> {
        let mut out = Vec::new();
        let mut nets = Vec::new();
        for d in raw {
            match d.get_ref().parse::<Destination>() {
                Ok(dest) => {
                    if let Destination::Cidr { net, ports } = &dest {
                        nets.push(((*net, ports.lo, ports.hi), d.span()));
                    }
                    out.push(dest);
                }
                Err(e) => self.diags.error(file, d.span(), e),
            }
        }
        // The list must fit the kernel's form (crate::dest_table) as it is: refused here,
        // with its position, rather than at a grant's issue or a reload.
        let list: Vec<_> = nets.iter().map(|(n, _)| *n).collect();
        if let Err(e) = crate::dest_table::DestTable::compile(&list) {
            let crate::dest_table::DestTableError::TooManyRanges { net, .. } = &e;
            let at = nets
                .iter()
                .find(|((n, _, _), _)| crate::dest_table::kernel_net(n) == kernel_v6(net))
                .map_or_else(|| raw[0].span(), |(_, span)| span.clone());
            self.diags.error(file, at, e.to_string());
        }
        out
    }

    fn duration(
        &mut self,
        file: usize,
        key: &str,
        d: &Spanned<String>,
    ) -> Option<std::time::Duration> {
        parse_duration(d.get_ref())
            .map_err(|e| self.diags.error(file, d.span(), format!("invalid {key}: {e}")))
            .ok()
    }

    /// One of a fixed set of string values; None (and an error) for anything else.
    fn choice<T: Copy>(
        &mut self,
        file: usize,
        key: &str,
        raw: Option<&Spanned<String>>,
        options: &[(&str, T)],
    ) -> Option<T> {
        let raw = raw?;
        let s = raw.get_ref().as_str();
        if let Some((_, v)) = options.iter().find(|(name, _)| *name == s) {
            return Some(*v);
        }
        let expected: Vec<String> = options.iter().map(|(name, _)| format!("`{name}`")).collect();
        self.diags.error(
            file,
            raw.span(),
            format!("invalid {key} `{s}`: expected one of {}", expected.join(", ")),
        );
        None
    }

    fn non_empty<'a>(&mut self, file: usize, key: &str, v: &'a Spanned<String>) -> Option<&'a str> {
        if v.get_ref().trim().is_empty() {
            self.diags.error(file, v.span(), format!("{key} must not be empty"));
            return None;
        }
        Some(v.get_ref())
    }

    fn absolute(&mut self, file: usize, key: &str, v: &Spanned<String>) -> Option<PathBuf> {
        if !v.get_ref().starts_with('/') {
            self.diags.error(
                file,
                v.span(),
                format!("{key} `{}` must be an absolute path", v.get_ref()),
            );
            return None;
        }
        Some(PathBuf::from(v.get_ref()))
    }

    /// Cross-file checks, then either the whole Config or every error found.
    pub fn finish(
        mut self,
        settings: Option<Settings>,
        source: String,
    ) -> Result<Config, Diagnostics> {
        let mut first: HashMap<&str, (usize, Range<usize>)> = HashMap::new();
        for def in &self.secrets {
            note_name(
                &mut self.diags,
                &mut first,
                "secret",
                &def.value.name,
                def.file,
                &def.name_span,
            );
        }
        let mut first_intent: HashMap<&str, (usize, Range<usize>)> = HashMap::new();
        for (def, refs) in &self.intents {
            let name = def.value.name.as_str();
            note_name(&mut self.diags, &mut first_intent, "intent", name, def.file, &def.name_span);
            if self.incomplete {
                continue;
            }
            for (secret, span) in def.value.secrets.iter().zip(refs) {
                if !first.contains_key(secret.as_str()) {
                    let msg = format!("intent `{name}` names undefined secret `{secret}`");
                    self.diags.error(def.file, span.clone(), msg);
                }
            }
        }

        if let Some(sp) = settings.as_ref().and_then(|s| s.spiffe.as_ref()) {
            for (file, span, d) in &self.spiffe_domains {
                if *d != sp.trust_domain {
                    let msg = format!(
                        "spiffe_id names trust domain `{d}`, but [spiffe] trust_domain is `{}`",
                        sp.trust_domain
                    );
                    self.diags.error(*file, span.clone(), msg);
                }
            }
        }
        match settings {
            Some(s) if !self.diags.has_errors() => Ok(Config {
                mode: s.mode,
                host: s.host,
                cgroup_root: s.cgroup_root,
                runtime_dir: s.runtime_dir,
                state_dir: s.state_dir,
                pin_dir: s.pin_dir,
                policy_dir: s.policy_dir,
                socket_group: s.socket_group,
                mint_rate_per_second: s.mint_rate_per_second,
                file_backend: s.file_backend,
                sinks: s.sinks,
                outbox: s.outbox,
                spiffe: s.spiffe,
                limits: s.limits,

                dns: s.dns,
                secrets: self.secrets.into_iter().map(|d| d.value).collect(),
                intents: self.intents.into_iter().map(|(d, _)| d.value).collect(),
                agents: self.agents,
                aws: s.aws,
                source,
            }),
            _ => Err(self.diags.into_diagnostics()),
        }
    }
}

/// Records where `name` was first defined, or reports a duplicate pointing back at it.
fn note_name<'a>(
    diags: &mut Collector,
    first: &mut HashMap<&'a str, (usize, Range<usize>)>,
    what: &str,
    name: &'a str,
    file: usize,
    span: &Range<usize>,
) {
    if let Some((f, s)) = first.get(name) {
        let msg = format!("duplicate {what} `{name}` (first defined at {})", diags.locate(*f, s));
        diags.error(file, span.clone(), msg);
    } else {
        first.insert(name, (file, span.clone()));
    }
}

/// A compiled-table network back in the kernel's IPv6 form.
fn kernel_v6(net: &ipnet::IpNet) -> ipnet::Ipv6Net {
    crate::dest_table::kernel_net(net)
}
