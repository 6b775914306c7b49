//! `[spiffe]`: workload identity (docs/contracts.md, "Workload identity"). Present, it enables
//! the SPIFFE Workload API on `<runtime_dir>/spiffe.sock`; each intent's `audiences` and
//! `spiffe_id` say which JWT-SVIDs a holder of its grant may fetch. Checked like the rest of the
//! config: every problem reported at its `file:line:col`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::diag::Collector;
use super::duration::{format_duration, parse_duration};

pub const DEFAULT_KEY_ROTATION: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffeConfig {
    /// e.g. "example.org": SPIFFE IDs are `spiffe://<trust_domain>/...`.
    pub trust_domain: String,
    /// How long a JWT signing key signs before the next one takes over. The previous key stays
    /// in the bundle for one more period, so every token it signed verifies until its `exp`.
    pub key_rotation: Duration,
    /// Longest JWT-SVID lifetime (shorter when the grant ends sooner).
    pub svid_ttl: Duration,
    /// The `iss` claim and the OIDC discovery `issuer`.
    pub issuer: String,
    /// Optional TCP listener for OIDC discovery (loopback, or any address with TLS).
    pub oidc_listen: Option<SocketAddr>,
    pub oidc_tls: Option<OidcTls>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcTls {
    /// PEM certificate chain and private key of the OIDC listener.
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSpiffe {
    trust_domain: Spanned<String>,
    key_rotation: Option<Spanned<String>>,
    svid_ttl: Option<Spanned<String>>,
    issuer: Option<Spanned<String>>,
    oidc_listen: Option<Spanned<String>>,
    oidc_tls_cert: Option<Spanned<String>>,
    oidc_tls_key: Option<Spanned<String>>,
}

/// A SPIFFE trust domain name: lower-case letters, digits, `.`, `-`, `_` (SPIFFE ID standard).
pub fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// A SPIFFE ID path: `/`-separated non-empty segments of letters, digits, `.`, `-`, `_`,
/// none of them `.` or `..`.
pub fn valid_path(p: &str) -> bool {
    p.starts_with('/')
        && p[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

/// Placeholders a per-intent `spiffe_id` template may use.
pub const SPIFFE_ID_PLACEHOLDERS: [&str; 3] = ["{intent}", "{uid}", "{gid}"];

/// Renders an intent's SPIFFE ID: the template (a path, or a full `spiffe://<trust_domain>/...`
/// ID) with `{intent}`, `{uid}`, `{gid}` replaced; the default is `/intent/{intent}`.
pub fn render_spiffe_id(
    trust_domain: &str,
    template: Option<&str>,
    intent: &str,
    uid: u32,
    gid: u32,
) -> String {
    let t = template.unwrap_or("/intent/{intent}");
    let path = t.strip_prefix("spiffe://").map_or(t, |rest| &rest[rest.find('/').unwrap_or(0)..]);
    let path = path
        .replace("{intent}", intent)
        .replace("{uid}", &uid.to_string())
        .replace("{gid}", &gid.to_string());
    format!("spiffe://{trust_domain}{path}")
}

/// Checks a `spiffe_id` template (its trust domain against `[spiffe]` later, in `finish`).
/// Returns the template's trust domain when it is a full ID.
pub(crate) fn check_template(
    diags: &mut Collector,
    file: usize,
    raw: &Spanned<String>,
) -> Option<Option<String>> {
    let t = raw.get_ref();
    let (domain, path) = match t.strip_prefix("spiffe://") {
        Some(rest) => match rest.find('/') {
            Some(i) => (Some(rest[..i].to_string()), &rest[i..]),
            None => (Some(rest.to_string()), ""),
        },
        None => (None, t.as_str()),
    };
    // Sample values: an intent name is itself a valid segment, ids are digits.
    let sample = path.replace("{intent}", "i").replace("{uid}", "0").replace("{gid}", "0");
    let mut problems = Vec::new();
    if domain.as_deref().is_some_and(|d| !valid_trust_domain(d)) {
        problems.push("its trust domain is not a valid SPIFFE trust domain".to_string());
    }
    if sample.contains(['{', '}']) {
        problems
            .push(format!("unknown placeholder (known: {})", SPIFFE_ID_PLACEHOLDERS.join(", ")));
    } else if !valid_path(&sample) {
        problems.push(
            "the path must be `/`-separated non-empty segments of letters, digits, `.`, `-`, `_` \
             (not `.` or `..`)"
                .into(),
        );
    }
    if problems.is_empty() {
        return Some(domain);
    }
    diags.error(file, raw.span(), format!("invalid spiffe_id `{t}`: {}", problems.join("; ")));
    None
}

pub(crate) fn spiffe(diags: &mut Collector, file: usize, raw: &RawSpiffe) -> Option<SpiffeConfig> {
    let mut ok = true;
    let td = raw.trust_domain.get_ref();
    if !valid_trust_domain(td) {
        diags.error(
            file,
            raw.trust_domain.span(),
            format!(
                "invalid trust_domain `{td}`: use lower-case letters, digits, `.`, `-` and `_` \
                 (a name such as `example.org`, without `spiffe://`)"
            ),
        );
        ok = false;
    }
    let mut duration = |key: &str, v: &Option<Spanned<String>>, default: Duration| match v {
        None => Some(default),
        Some(s) => match parse_duration(s.get_ref()) {
            Ok(d) if d >= Duration::from_secs(1) => Some(d),
            Ok(_) => {
                diags.error(file, s.span(), format!("{key} must be at least 1s"));
                None
            }
            Err(e) => {
                diags.error(file, s.span(), format!("invalid {key}: {e}"));
                None
            }
        },
    };
    let key_rotation = duration("key_rotation", &raw.key_rotation, DEFAULT_KEY_ROTATION);
    let svid_ttl = duration("svid_ttl", &raw.svid_ttl, DEFAULT_SVID_TTL);
    if let (Some(rot), Some(ttl)) = (key_rotation, svid_ttl)
        && rot < ttl
    {
        // The bundle holds the current and the previous key: a token must expire before the
        // key that signed it leaves, i.e. within one rotation period.
        let span = raw
            .key_rotation
            .as_ref()
            .map(Spanned::span)
            .unwrap_or(raw.svid_ttl.as_ref().map(Spanned::span).unwrap_or(0..0));
        diags.error(
            file,
            span,
            format!(
                "key_rotation {} is shorter than svid_ttl {}: a token must expire before its \
                 signing key leaves the bundle (one rotation period after it was replaced)",
                format_duration(rot),
                format_duration(ttl)
            ),
        );
        ok = false;
    }
    let oidc_listen = match &raw.oidc_listen {
        None => None,
        Some(s) => match s.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some((a, s.span())),
            Err(_) => {
                diags.error(
                    file,
                    s.span(),
                    format!("invalid oidc_listen `{}`: expected IP:PORT", s.get_ref()),
                );
                ok = false;
                None
            }
        },
    };
    let oidc_tls = match (&raw.oidc_tls_cert, &raw.oidc_tls_key) {
        (None, None) => None,
        (Some(c), Some(k)) => {
            let mut abs = |v: &Spanned<String>, key: &str| {
                if v.get_ref().starts_with('/') {
                    Some(PathBuf::from(v.get_ref()))
                } else {
                    diags.error(file, v.span(), format!("{key} must be an absolute path"));
                    None
                }
            };
            match (abs(c, "oidc_tls_cert"), abs(k, "oidc_tls_key")) {
                (Some(cert), Some(key)) => Some(OidcTls { cert, key }),
                _ => {
                    ok = false;
                    None
                }
            }
        }
        (Some(v), None) | (None, Some(v)) => {
            diags.error(file, v.span(), "oidc_tls_cert and oidc_tls_key go together");
            ok = false;
            None
        }
    };
    if let Some((addr, span)) = &oidc_listen {
        if oidc_tls.is_none() && !addr.ip().is_loopback() {
            diags.error(
                file,
                span.clone(),
                format!(
                    "oidc_listen {addr} is not a loopback address: serve it with TLS \
                     (oidc_tls_cert, oidc_tls_key) or on 127.0.0.1 / [::1] behind a proxy"
                ),
            );
            ok = false;
        }
    } else if let Some(v) = &raw.oidc_tls_cert {
        diags.error(file, v.span(), "oidc_tls_cert without oidc_listen: nothing would serve it");
        ok = false;
    }
    let issuer = match &raw.issuer {
        Some(s) => {
            let v = s.get_ref();
            let host_ok = v
                .strip_prefix("https://")
                .or_else(|| v.strip_prefix("http://"))
                .is_some_and(|rest| !rest.is_empty() && !rest.contains(['?', '#']));
            if !host_ok || v.ends_with('/') {
                diags.error(
                    file,
                    s.span(),
                    format!(
                        "invalid issuer `{v}`: expected an https:// (or http://) URL without \
                         query, fragment or trailing `/`"
                    ),
                );
                ok = false;
            }
            v.clone()
        }
        None => match &oidc_listen {
            Some((addr, _)) if oidc_tls.is_some() => format!("https://{addr}"),
            Some((addr, _)) => format!("http://{addr}"),
            None => format!("https://{td}"),
        },
    };
    let (key_rotation, svid_ttl) = (key_rotation?, svid_ttl?);
    ok.then(|| SpiffeConfig {
        trust_domain: td.clone(),
        key_rotation,
        svid_ttl,
        issuer,
        oidc_listen: oidc_listen.map(|(a, _)| a),
        oidc_tls,
    })
}

/// Intent `audiences`: non-empty strings without control characters.
pub(crate) fn audiences(
    diags: &mut Collector,
    file: usize,
    raw: &[Spanned<String>],
) -> Vec<String> {
    let mut out = Vec::new();
    for a in raw {
        let s = a.get_ref();
        if s.is_empty() || s.len() > 512 || s.chars().any(char::is_control) {
            diags.error(
                file,
                a.span(),
                format!(
                    "invalid audience {s:?}: a non-empty string of at most 512 printable characters"
                ),
            );
        } else if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}
