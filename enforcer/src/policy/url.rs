//! `https://host[:port]/path`, the only URL form a webhook or HEC sink accepts: alerts name
//! processes, secrets and hosts, so they are never sent in clear text. Parsed once when the
//! config loads; the sinks use the parsed parts and never parse again.
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl {
    /// As written; an IPv6 literal keeps its brackets ("[::1]").
    pub host: String,
    pub port: u16,
    /// Starts with `/`; "/" when the URL has no path.
    pub path: String,
}

/// Why a string is not an `HttpsUrl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlError(&'static str);

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for UrlError {}

impl HttpsUrl {
    pub fn parse(s: &str) -> Result<HttpsUrl, UrlError> {
        let rest = s.strip_prefix("https://").ok_or(UrlError("not an https:// URL"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(UrlError("credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or(UrlError("unclosed ["))?;
            (format!("[{h}]"), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| UrlError("bad port"))?,
            None => 443,
        };
        if host.is_empty() || host == "[]" || port == 0 || path.contains(char::is_whitespace) {
            return Err(UrlError("bad URL"));
        }
        Ok(HttpsUrl { host, port, path: path.to_string() })
    }

    /// The host to connect to and to name in TLS: without an IPv6 literal's brackets.
    pub fn connect_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }

    /// The `Host` header value: the port only when it is not 443.
    pub fn authority(&self) -> String {
        if self.port == 443 { self.host.clone() } else { format!("{}:{}", self.host, self.port) }
    }
}

impl fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}{}", self.authority(), self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_and_path() {
        let u = HttpsUrl::parse("https://splunk.example:8088/services/collector/event").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("splunk.example", 8088));
        assert_eq!(u.path, "/services/collector/event");
        assert_eq!(u.authority(), "splunk.example:8088");
        let u = HttpsUrl::parse("https://h").unwrap();
        assert_eq!((u.port, u.path.as_str(), u.authority()), (443, "/", "h".to_string()));
        assert_eq!(u.to_string(), "https://h/");
        let u = HttpsUrl::parse("https://[::1]:9443/x").unwrap();
        assert_eq!((u.host.as_str(), u.connect_host(), u.port), ("[::1]", "::1", 9443));
    }

    #[test]
    fn rejects_what_is_not_https_host_path() {
        for bad in [
            "http://x/y",
            "x/y",
            "https://",
            "https://:443/",
            "https://[]/",
            "https://[::1/",
            "https://h:0/",
            "https://h:99999/",
            "https://h:x/",
            "https://u:p@h/",
            "https://h/a b",
        ] {
            assert!(HttpsUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
