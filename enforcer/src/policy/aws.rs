//! Brokered AWS credentials in the policy: the daemon's `[aws]` settings (where its own base
//! credentials come from, where the container-credentials endpoint listens) and an intent's
//! `[intent.aws]` (role, STS endpoint, region, session policy). The session policy file is
//! read and validated at load, so a broken JSON file is a `file:line:col` error like any
//! other and the STS call never sends something STS would refuse.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::diag::Collector;

/// STS refuses packed session policies longer than this (characters, minified).
pub const MAX_SESSION_POLICY_CHARS: usize = 2048;

/// `[aws]` (config file only).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAws {
    credentials_file: Option<Spanned<String>>,
    profile: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
}

/// `[intent.aws]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIntentAws {
    role_arn: Spanned<String>,
    sts_endpoint: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    session_policy: Option<Spanned<String>>,
}

/// The daemon's own AWS settings. Its base credentials (the ones allowed to call
/// sts:AssumeRole) come from `credentials_file` when set, else from the daemon's own
/// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), never from
/// any agent's home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSettings {
    /// An AWS shared-credentials (INI) file readable by root only.
    pub credentials_file: Option<PathBuf>,
    /// Profile (section) of `credentials_file`.
    pub profile: String,
    /// The container-credentials endpoint: loopback only; port 0 picks one at start.
    pub listen: SocketAddr,
}

impl Default for AwsSettings {
    fn default() -> Self {
        AwsSettings {
            credentials_file: None,
            profile: "default".into(),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        }
    }
}

/// An intent's AWS credential source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsIntent {
    pub role_arn: String,
    /// Scheme, host and port of STS (`https://sts.<region>.amazonaws.com` by default).
    pub sts_endpoint: StsEndpoint,
    pub region: String,
    /// The session policy file as configured.
    pub session_policy: Option<PathBuf>,
    /// Its content, validated and minified at load (what is sent to STS).
    pub session_policy_json: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsEndpoint {
    pub https: bool,
    /// Host name or address, without brackets.
    pub host: String,
    pub port: u16,
}

impl StsEndpoint {
    /// The `Host` header value.
    pub fn authority(&self) -> String {
        let host =
            if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let default = if self.https { 443 } else { 80 };
        if self.port == default { host } else { format!("{host}:{}", self.port) }
    }

    /// As a policy destination (what a grant of the intent may connect to).
    pub fn destination(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => format!("{a}/32:{}", self.port),
            Ok(IpAddr::V6(a)) => format!("[{a}/128]:{}", self.port),
            Err(_) => format!("{}:{}", self.host, self.port),
        }
    }

    pub fn url(&self) -> String {
        format!("{}://{}/", if self.https { "https" } else { "http" }, self.authority())
    }
}

pub(crate) fn settings(diags: &mut Collector, file: usize, raw: Option<&RawAws>) -> AwsSettings {
    let mut s = AwsSettings::default();
    let Some(raw) = raw else { return s };
    if let Some(p) = &raw.credentials_file {
        if p.get_ref().starts_with('/') {
            s.credentials_file = Some(PathBuf::from(p.get_ref()));
        } else {
            let msg = format!("credentials_file `{}` must be an absolute path", p.get_ref());
            diags.error(file, p.span(), msg);
        }
    }
    if let Some(p) = &raw.profile {
        if p.get_ref().trim().is_empty() {
            diags.error(file, p.span(), "profile must not be empty");
        } else {
            s.profile = p.get_ref().clone();
        }
    }
    if let Some(l) = &raw.listen {
        match l.get_ref().parse::<SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => s.listen = a,
            Ok(_) => diags.error(
                file,
                l.span(),
                format!("listen `{}` must be a loopback address (127.0.0.1:PORT)", l.get_ref()),
            ),
            Err(e) => diags.error(file, l.span(), format!("invalid listen `{}`: {e}", l.get_ref())),
        }
    }
    s
}

pub(crate) fn intent(
    diags: &mut Collector,
    file: usize,
    intent: &str,
    raw: &RawIntentAws,
) -> Option<AwsIntent> {
    let before = diags.error_count();
    let arn = raw.role_arn.get_ref();
    if !valid_role_arn(arn) {
        diags.error(
            file,
            raw.role_arn.span(),
            format!(
                "role_arn `{arn}` is not an IAM role ARN (arn:aws:iam::<12 digits>:role/<name>)"
            ),
        );
    }
    let region = match &raw.region {
        Some(r) if valid_region(r.get_ref()) => r.get_ref().clone(),
        Some(r) => {
            diags.error(file, r.span(), format!("invalid region `{}`", r.get_ref()));
            String::new()
        }
        None => "us-east-1".into(),
    };
    let sts_endpoint = match &raw.sts_endpoint {
        Some(e) => parse_endpoint(e.get_ref())
            .map_err(|m| diags.error(file, e.span(), format!("invalid sts_endpoint: {m}")))
            .ok(),
        None => Some(StsEndpoint {
            https: true,
            host: format!("sts.{region}.amazonaws.com"),
            port: 443,
        }),
    };
    let (session_policy, session_policy_json) = match &raw.session_policy {
        Some(p) if !p.get_ref().starts_with('/') => {
            let msg = format!("session_policy `{}` must be an absolute path", p.get_ref());
            diags.error(file, p.span(), msg);
            (None, None)
        }
        Some(p) => {
            let path = PathBuf::from(p.get_ref());
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let json = session_policy(diags, p.get_ref().clone(), text);
                    (Some(path), json)
                }
                Err(e) => {
                    let msg = format!("intent `{intent}`: cannot read session_policy: {e}");
                    diags.error(file, p.span(), msg);
                    (None, None)
                }
            }
        }
        None => (None, None),
    };
    if diags.error_count() != before {
        return None;
    }
    Some(AwsIntent {
        role_arn: arn.clone(),
        sts_endpoint: sts_endpoint?,
        region,
        session_policy,
        session_policy_json,
    })
}

/// Validates an IAM policy document; errors point into the JSON file itself.
fn session_policy(diags: &mut Collector, name: String, text: String) -> Option<String> {
    let value: Result<serde_json::Value, _> = serde_json::from_str(&text);
    let file = diags.add_source(name, text);
    let value = match value {
        Ok(v) => v,
        Err(e) => {
            let at = offset_of(&diags.sources[file].text, e.line(), e.column());
            diags.error(file, at..at, format!("session policy is not valid JSON: {e}"));
            return None;
        }
    };
    let Some(obj) = value.as_object() else {
        diags.error(file, 0..0, "session policy must be a JSON object (an IAM policy document)");
        return None;
    };
    match obj.get("Statement") {
        Some(serde_json::Value::Array(a)) if !a.is_empty() => {}
        Some(serde_json::Value::Object(_)) => {}
        _ => {
            diags.error(file, 0..0, "session policy needs a non-empty `Statement`");
            return None;
        }
    }
    let packed = serde_json::to_string(&value).ok()?;
    if packed.len() > MAX_SESSION_POLICY_CHARS {
        diags.error(
            file,
            0..0,
            format!(
                "session policy is {} characters minified; STS accepts at most {MAX_SESSION_POLICY_CHARS}",
                packed.len()
            ),
        );
        return None;
    }
    Some(packed)
}

/// Byte offset of serde_json's 1-based line and column (column 0: the line's start).
fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let mut off = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            return off + column.saturating_sub(1).min(l.len());
        }
        off += l.len();
    }
    text.len()
}

fn valid_role_arn(s: &str) -> bool {
    let parts: Vec<&str> = s.splitn(6, ':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5].strip_prefix("role/").is_some_and(|n| {
            !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b))
        })
}

fn valid_region(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `http(s)://host[:port][/]`. Plain HTTP only to a loopback address: base credentials and
/// the minted ones would otherwise cross a network in clear.
pub fn parse_endpoint(s: &str) -> Result<StsEndpoint, String> {
    let (https, rest) = if let Some(r) = s.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = s.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("`{s}` must start with https:// (or http:// for a loopback address)"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return Err(format!("`{s}`: give scheme, host and port only"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6.split_once(']').ok_or_else(|| format!("`{s}`: unclosed `[`"))?;
        (h.to_string(), tail.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => {
            p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("`{s}`: bad port"))?
        }
        None if https => 443,
        None => 80,
    };
    if host.is_empty() {
        return Err(format!("`{s}`: no host"));
    }
    if !https && !host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback()) {
        return Err(format!("`{s}`: plain http:// is allowed only to a loopback address"));
    }
    Ok(StsEndpoint { https, host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = parse_endpoint("http://127.0.0.1:5000").unwrap();
        assert_eq!((e.https, e.host.as_str(), e.port), (false, "127.0.0.1", 5000));
        assert_eq!(e.destination(), "127.0.0.1/32:5000");
        assert_eq!(e.authority(), "127.0.0.1:5000");
        let e = parse_endpoint("https://sts.eu-west-1.amazonaws.com/").unwrap();
        assert_eq!((e.port, e.authority().as_str()), (443, "sts.eu-west-1.amazonaws.com"));
        assert_eq!(e.destination(), "sts.eu-west-1.amazonaws.com:443");
        assert!(parse_endpoint("http://sts.amazonaws.com").is_err());
        assert!(parse_endpoint("http://10.0.0.1:80").is_err());
        assert!(parse_endpoint("ftp://x").is_err());
        assert!(parse_endpoint("https://a/b").is_err());
        assert!(parse_endpoint("https://u@a").is_err());
        let e = parse_endpoint("http://[::1]:8080").unwrap();
        assert_eq!((e.host.as_str(), e.authority().as_str()), ("::1", "[::1]:8080"));
    }

    #[test]
    fn arns() {
        assert!(valid_role_arn("arn:aws:iam::123456789012:role/deploy"));
        assert!(valid_role_arn("arn:aws-cn:iam::123456789012:role/path/deploy-1"));
        assert!(!valid_role_arn("arn:aws:iam::12345678901:role/deploy"));
        assert!(!valid_role_arn("arn:aws:iam::123456789012:user/deploy"));
        assert!(!valid_role_arn("arn:aws:s3:::bucket"));
    }

    #[test]
    fn config_errors_name_their_place() {
        let text = "[aws]\nlisten = \"0.0.0.0:9000\"\ncredentials_file = \"rel\"\n\
                    [[secret]]\nname = \"db\"\nvalue_file = \"db.txt\"\n\
                    [[secret]]\nname = \"none\"\n\
                    [[intent]]\nname = \"i\"\n[intent.aws]\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\nregion = \"US EAST\"\nextra = 1\n";
        let err = crate::policy::load_str("/c.toml", text).unwrap_err().to_string();
        // serde stops at the unknown key: the rest is checked once it is gone.
        assert!(err.contains("/c.toml:14:1: unknown field `extra`"), "{err}");
        let err = crate::policy::load_str("/c.toml", &text.replace("extra = 1\n", ""))
            .unwrap_err()
            .to_string();
        for want in [
            "/c.toml:2:10: listen `0.0.0.0:9000` must be a loopback address",
            "/c.toml:3:20: credentials_file `rel` must be an absolute path",
            "/c.toml:6:14: value_file `db.txt` must be an absolute path",
            "/c.toml:8:8: secret `none` has no paths",
            "/c.toml:13:10: invalid region `US EAST`",
        ] {
            assert!(err.contains(want), "{want}\n{err}");
        }
        let ok = crate::policy::load_str(
            "/c.toml",
            "[aws]\nlisten = \"127.0.0.1:19555\"\n[[secret]]\nname = \"db\"\nvalue_file = \"/etc/db\"\n\
             [[intent]]\nname = \"i\"\nsecrets = [\"db\"]\n[intent.aws]\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n",
        )
        .unwrap();
        assert_eq!(ok.aws.listen.port(), 19555);
        let aws = ok.intents[0].aws.as_ref().unwrap();
        assert_eq!(aws.sts_endpoint.url(), "https://sts.us-east-1.amazonaws.com/");
        assert_eq!(ok.secrets[0].value_file.as_deref(), Some(std::path::Path::new("/etc/db")));
    }

    #[test]
    fn json_positions() {
        assert_eq!(offset_of("{\n  \"a\": x\n}", 2, 8), 9);
        assert_eq!(offset_of("x", 1, 1), 0);
    }
}
