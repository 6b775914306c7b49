//! `[[sink]]` and `[outbox]` tables: where alerts are delivered, and how much undelivered
//! history the outbox under the state dir may hold. Checked like the rest of the config, every
//! problem reported at its `file:line:col`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::diag::Collector;
use super::url::HttpsUrl;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub const ALL: [(&'static str, Severity); 5] = [
        ("info", Severity::Info),
        ("low", Severity::Low),
        ("medium", Severity::Medium),
        ("high", Severity::High),
        ("critical", Severity::Critical),
    ];

    /// None for a string that is not a severity (callers decide how to rank it).
    pub fn parse(s: &str) -> Option<Severity> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, v)| *v)
    }

    pub fn as_str(self) -> &'static str {
        Self::ALL.iter().find(|(_, v)| *v == self).map(|(n, _)| *n).unwrap_or("info")
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `type` of a sink, without its options (what the type-specific checks branch on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkType {
    File,
    Stdout,
    Syslog,
    Webhook,
    SplunkHec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SinkFormat {
    /// enforcer.event/v1, one JSON object per event.
    #[default]
    Json,
    Ocsf,
}

/// A credential that must never appear in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// One `[[sink]]`: what every sink type has (name, filters, format, rate limit), and in `kind`
/// only the options of its own type, already checked (paths absolute, URL parsed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    pub name: String,
    pub min_severity: Severity,
    /// Empty = every verdict.
    pub verdicts: Vec<String>,
    pub format: SinkFormat,
    /// 0 = unlimited.
    pub rate_limit_per_second: u32,
    pub kind: SinkKind,
}

/// A sink's type with its type's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkKind {
    File(FileSinkConfig),
    Stdout,
    Syslog(SyslogSinkConfig),
    Webhook(HttpsSinkConfig),
    SplunkHec(HecSinkConfig),
}

impl SinkKind {
    /// The `type` as written in the config (also the `type` label of the sink metrics).
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkKind::File(_) => "file",
            SinkKind::Stdout => "stdout",
            SinkKind::Syslog(_) => "syslog",
            SinkKind::Webhook(_) => "webhook",
            SinkKind::SplunkHec(_) => "splunk_hec",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSinkConfig {
    pub path: PathBuf,
    /// Size at which the file is rotated.
    pub max_bytes: u64,
    pub max_backups: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogSinkConfig {
    /// host:port.
    pub address: String,
    /// None: plain TCP (`tls = false`, the TLS options are then unused).
    pub tls: Option<TlsOptions>,
}

/// A webhook, or the HTTPS part of a Splunk HEC sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsSinkConfig {
    pub url: HttpsUrl,
    /// Extra request headers, names and values checked.
    pub headers: Vec<(String, String)>,
    pub tls: TlsOptions,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HecSinkConfig {
    pub https: HttpsSinkConfig,
    pub token: Redacted,
}

/// How a sink's TLS client trusts and identifies itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsOptions {
    /// CA bundle; None = the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub client_auth: Option<ClientAuth>,
    /// Name to verify instead of the host of the address or URL.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub const DEFAULT_SINK_MAX_BYTES: u64 = 100 * 1024 * 1024;
pub const DEFAULT_SINK_MAX_BACKUPS: u32 = 5;

/// Bounds of `<state_dir>/events.jsonl` and its backups, the durable outbox sinks read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxConfig {
    /// Size at which the live file is rotated.
    pub rotate_bytes: u64,
    /// Backups kept when no sink still needs older ones.
    pub max_backups: u32,
    /// Hard bound on all backups together: past it the oldest is deleted even when a lagging
    /// sink still needs it, and a notice says so.
    pub max_bytes: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            rotate_bytes: 64 * 1024 * 1024,
            max_backups: 3,
            max_bytes: 1024 * 1024 * 1024,
        }
    }
}

pub const VERDICTS: [&str; 5] = ["allowed", "no_grant", "expired", "revoked", "out_of_intent"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutbox {
    rotate_bytes: Option<Spanned<u64>>,
    max_backups: Option<Spanned<u32>>,
    max_bytes: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSink {
    name: Spanned<String>,
    #[serde(rename = "type")]
    kind: Spanned<String>,
    min_severity: Option<Spanned<String>>,
    #[serde(default)]
    verdicts: Vec<Spanned<String>>,
    format: Option<Spanned<String>>,
    rate_limit_per_second: Option<Spanned<u32>>,
    path: Option<Spanned<String>>,
    max_bytes: Option<Spanned<u64>>,
    max_backups: Option<Spanned<u32>>,
    address: Option<Spanned<String>>,
    tls: Option<Spanned<bool>>,
    ca_file: Option<Spanned<String>>,
    client_cert: Option<Spanned<String>>,
    client_key: Option<Spanned<String>>,
    server_name: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    headers: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    token: Option<Spanned<String>>,
}

pub(crate) fn outbox(diags: &mut Collector, file: usize, raw: Option<&RawOutbox>) -> OutboxConfig {
    let mut o = OutboxConfig::default();
    let Some(raw) = raw else { return o };
    if let Some(v) = &raw.rotate_bytes {
        if *v.get_ref() < 4096 {
            diags.error(file, v.span(), "outbox rotate_bytes must be at least 4096");
        } else {
            o.rotate_bytes = *v.get_ref();
        }
    }
    if let Some(v) = &raw.max_backups {
        if *v.get_ref() == 0 {
            // Rotation with no backup would delete events no sink has read yet.
            diags.error(file, v.span(), "outbox max_backups must be at least 1");
        } else {
            o.max_backups = *v.get_ref();
        }
    }
    if let Some(v) = &raw.max_bytes {
        if *v.get_ref() < o.rotate_bytes {
            diags.error(file, v.span(), "outbox max_bytes must be at least rotate_bytes");
        } else {
            o.max_bytes = *v.get_ref();
        }
    }
    o
}

/// Checks every sink; returns those without errors (the load fails anyway if any had one).
pub(crate) fn sinks(
    diags: &mut Collector,
    file: usize,
    raw: &[Spanned<RawSink>],
) -> Vec<SinkConfig> {
    let mut out = Vec::new();
    let mut seen: HashMap<String, Range<usize>> = HashMap::new();
    for s in raw {
        let before = diags.error_count();
        let cfg = sink(diags, file, s);
        let name = s.get_ref().name.get_ref();
        if let Some(first) = seen.get(name) {
            let at = diags.locate(file, first);
            diags.error(
                file,
                s.get_ref().name.span(),
                format!("duplicate sink `{name}` (first defined at {at})"),
            );
        } else {
            seen.insert(name.clone(), s.get_ref().name.span());
        }
        if diags.error_count() == before {
            out.extend(cfg);
        }
    }
    out
}

fn choice<T: Copy>(
    diags: &mut Collector,
    file: usize,
    key: &str,
    raw: &Spanned<String>,
    options: &[(&str, T)],
) -> Option<T> {
    let s = raw.get_ref().as_str();
    if let Some((_, v)) = options.iter().find(|(n, _)| *n == s) {
        return Some(*v);
    }
    let expected: Vec<String> = options.iter().map(|(n, _)| format!("`{n}`")).collect();
    diags.error(
        file,
        raw.span(),
        format!("invalid {key} `{s}`: expected one of {}", expected.join(", ")),
    );
    None
}

fn sink(diags: &mut Collector, file: usize, raw: &Spanned<RawSink>) -> Option<SinkConfig> {
    let r = raw.get_ref();
    let name = r.name.get_ref().clone();
    // The name is also the cursor's file name under <state_dir>/sinks/: keep it a plain word.
    let ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        diags.error(file, r.name.span(), format!("invalid sink name `{name}`: use letters, digits, `-`, `_` and `.`, starting with a letter or digit"));
    }
    let kind = choice(
        diags,
        file,
        "sink type",
        &r.kind,
        &[
            ("file", SinkType::File),
            ("stdout", SinkType::Stdout),
            ("syslog", SinkType::Syslog),
            ("webhook", SinkType::Webhook),
            ("splunk_hec", SinkType::SplunkHec),
        ],
    );
    let min_severity = r
        .min_severity
        .as_ref()
        .and_then(|v| choice(diags, file, "min_severity", v, &Severity::ALL))
        .unwrap_or(Severity::Info);
    let mut verdicts = Vec::new();
    for v in &r.verdicts {
        if VERDICTS.contains(&v.get_ref().as_str()) {
            verdicts.push(v.get_ref().clone());
        } else {
            let expected: Vec<String> = VERDICTS.iter().map(|n| format!("`{n}`")).collect();
            diags.error(
                file,
                v.span(),
                format!(
                    "invalid verdict `{}`: expected one of {}",
                    v.get_ref(),
                    expected.join(", ")
                ),
            );
        }
    }
    let format = r
        .format
        .as_ref()
        .and_then(|v| {
            choice(
                diags,
                file,
                "format",
                v,
                &[("json", SinkFormat::Json), ("ocsf", SinkFormat::Ocsf)],
            )
        })
        .unwrap_or_default();
    let kind = kind?;

    // Options that belong to another sink type are mistakes (a typo'd type, a copied table):
    // say so rather than ignore them.
    let type_name = r.kind.get_ref();
    let mut only = |key: &str, span: Option<Range<usize>>, allowed: &[SinkType]| {
        if let Some(span) = span
            && !allowed.contains(&kind)
        {
            diags.error(file, span, format!("`{key}` does not apply to sink type `{type_name}`"));
        }
    };
    use SinkType::*;
    only("path", r.path.as_ref().map(Spanned::span), &[File]);
    only("max_bytes", r.max_bytes.as_ref().map(Spanned::span), &[File]);
    only("max_backups", r.max_backups.as_ref().map(Spanned::span), &[File]);
    only("address", r.address.as_ref().map(Spanned::span), &[Syslog]);
    only("tls", r.tls.as_ref().map(Spanned::span), &[Syslog]);
    only("client_cert", r.client_cert.as_ref().map(Spanned::span), &[Syslog, Webhook, SplunkHec]);
    only("client_key", r.client_key.as_ref().map(Spanned::span), &[Syslog, Webhook, SplunkHec]);
    only("ca_file", r.ca_file.as_ref().map(Spanned::span), &[Syslog, Webhook, SplunkHec]);
    only("server_name", r.server_name.as_ref().map(Spanned::span), &[Syslog, Webhook, SplunkHec]);
    only("url", r.url.as_ref().map(Spanned::span), &[Webhook, SplunkHec]);
    only("headers", r.headers.as_ref().map(Spanned::span), &[Webhook, SplunkHec]);
    only("token", r.token.as_ref().map(Spanned::span), &[SplunkHec]);

    let abs = |diags: &mut Collector, key: &str, v: &Option<Spanned<String>>| -> Option<PathBuf> {
        let v = v.as_ref()?;
        if !v.get_ref().starts_with('/') {
            diags.error(
                file,
                v.span(),
                format!("{key} `{}` must be an absolute path", v.get_ref()),
            );
            return None;
        }
        Some(PathBuf::from(v.get_ref()))
    };
    let path = abs(diags, "path", &r.path);
    let ca_file = abs(diags, "ca_file", &r.ca_file);
    let client_cert = abs(diags, "client_cert", &r.client_cert);
    let client_key = abs(diags, "client_key", &r.client_key);
    if r.client_cert.is_some() != r.client_key.is_some() {
        let span = r
            .client_cert
            .as_ref()
            .or(r.client_key.as_ref())
            .map(Spanned::span)
            .unwrap_or(raw.span());
        diags.error(file, span, "`client_cert` and `client_key` go together");
    }
    let missing = |diags: &mut Collector, key: &str| {
        diags.error(
            file,
            r.name.span(),
            format!("sink `{name}` of type `{type_name}` needs `{key}`"),
        );
    };
    if kind == File && r.path.is_none() {
        missing(diags, "path");
    }
    let mut address = None;
    if kind == Syslog {
        match &r.address {
            None => missing(diags, "address"),
            Some(a) => {
                let ok = a
                    .get_ref()
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if ok {
                    address = Some(a.get_ref().clone());
                } else {
                    diags.error(
                        file,
                        a.span(),
                        format!("syslog address `{}` must be host:port", a.get_ref()),
                    );
                }
            }
        }
    }
    let mut url = None;
    if matches!(kind, Webhook | SplunkHec) {
        match &r.url {
            None => missing(diags, "url"),
            Some(u) => match HttpsUrl::parse(u.get_ref()) {
                Ok(parsed) => url = Some(parsed),
                Err(_) => diags.error(
                    file,
                    u.span(),
                    format!("url `{}` must be https://host[:port]/path", u.get_ref()),
                ),
            },
        }
    }
    let mut token = None;
    if kind == SplunkHec {
        match &r.token {
            None => missing(diags, "token"),
            Some(t) if t.get_ref().trim().is_empty() => {
                diags.error(file, t.span(), "token must not be empty")
            }
            Some(t) => token = Some(Redacted(t.get_ref().clone())),
        }
    }
    let mut headers = Vec::new();
    if let Some(h) = &r.headers {
        for (k, v) in h.get_ref() {
            let bad_name = k.is_empty()
                || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b));
            if bad_name || v.get_ref().contains(['\r', '\n']) {
                diags.error(file, v.span(), format!("invalid header `{k}`"));
            } else {
                headers.push((k.clone(), v.get_ref().clone()));
            }
        }
    }
    let max_backups =
        r.max_backups.as_ref().map(|v| *v.get_ref()).unwrap_or(DEFAULT_SINK_MAX_BACKUPS);
    let max_bytes = match &r.max_bytes {
        Some(v) if *v.get_ref() < 4096 => {
            diags.error(file, v.span(), "max_bytes must be at least 4096");
            DEFAULT_SINK_MAX_BYTES
        }
        Some(v) => *v.get_ref(),
        None => DEFAULT_SINK_MAX_BYTES,
    };

    // Every problem was reported above; a part missing here only drops a sink whose load
    // fails anyway.
    let tls = TlsOptions {
        ca_file,
        client_auth: client_cert.zip(client_key).map(|(cert, key)| ClientAuth { cert, key }),
        server_name: r.server_name.as_ref().map(|v| v.get_ref().clone()),
    };
    let kind = match kind {
        File => SinkKind::File(FileSinkConfig { path: path?, max_bytes, max_backups }),
        Stdout => SinkKind::Stdout,
        Syslog => SinkKind::Syslog(SyslogSinkConfig {
            address: address?,
            tls: r.tls.as_ref().is_some_and(|v| *v.get_ref()).then_some(tls),
        }),
        Webhook => SinkKind::Webhook(HttpsSinkConfig { url: url?, headers, tls }),
        SplunkHec => SinkKind::SplunkHec(HecSinkConfig {
            https: HttpsSinkConfig { url: url?, headers, tls },
            token: token?,
        }),
    };
    Some(SinkConfig {
        name,
        min_severity,
        verdicts,
        format,
        rate_limit_per_second: r.rate_limit_per_second.as_ref().map(|v| *v.get_ref()).unwrap_or(0),
        kind,
    })
}
