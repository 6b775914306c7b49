//! The body of `POST /v1/grants`, parsed and validated without any I/O, and why a body is
//! refused. Everything here is pure so the fuzz crate (`fuzz/`) can include this file by path; keep
//! its dependencies to `crate::policy`, serde and serde_json.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::policy::{Intent, format_duration, parse_duration};

/// Larger bodies are refused before parsing: a grant request is a few dozen bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Longest intent name accepted (names are also used in events and tokens).
pub const MAX_INTENT_LEN: usize = 128;
/// Caller-supplied strings echoed back in messages are cut to this many characters, so an error
/// never reflects a large body.
const ECHO_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRequest {
    pub intent: String,
    pub ttl: Option<Duration>,
    /// Bind the grant to this process instead of the caller (must be the caller's descendant
    /// unless the caller is root; checked by `attest::may_bind`).
    pub pid: Option<u32>,
    /// The target's start time as the requester pinned it (clock ticks since boot,
    /// /proc/PID/stat field 22): the daemon refuses the request if `pid` now names a process
    /// that started at another time (the target exited and its pid was reused).
    pub pid_start_time: Option<u64>,
}

/// Why a request body was refused. The Mint API turns the kind into an HTTP status and its
/// stable error code (`crate::api::error`); `code()` is that code, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestErrorKind {
    /// Larger than MAX_BODY.
    TooLarge,
    /// Not JSON, or not a JSON object.
    MalformedJson,
    /// Missing, unknown, duplicate or ill-typed fields; invalid intent name.
    InvalidRequest,
    InvalidTtl,
    InvalidPid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub kind: RequestErrorKind,
    pub message: String,
}

impl RequestError {
    pub fn new(kind: RequestErrorKind, message: impl Into<String>) -> Self {
        RequestError { kind, message: message.into() }
    }

    /// The stable machine code of the kind.
    pub fn code(&self) -> &'static str {
        match self.kind {
            RequestErrorKind::TooLarge => "body_too_large",
            RequestErrorKind::MalformedJson => "malformed_json",
            RequestErrorKind::InvalidRequest => "invalid_request",
            RequestErrorKind::InvalidTtl => "invalid_ttl",
            RequestErrorKind::InvalidPid => "invalid_pid",
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code(), self.message)
    }
}

impl std::error::Error for RequestError {}

/// Second pass over an already valid JSON object: the derived visitor rejects unknown and
/// duplicate keys (a `Value` map would silently keep the last duplicate, and a proxy or logger
/// that keeps the first would then disagree with us about what was asked). Values stay `Value`
/// so each field gets its own error code below.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    intent: Option<Value>,
    ttl: Option<Value>,
    pid: Option<Value>,
    pid_start_time: Option<Value>,
}

pub fn parse(body: &[u8]) -> Result<GrantRequest, RequestError> {
    if body.len() > MAX_BODY {
        return Err(RequestError::new(
            RequestErrorKind::TooLarge,
            format!("request body is {} bytes; the limit is {MAX_BODY}", body.len()),
        ));
    }
    // First pass: syntax (serde_json enforces UTF-8 and a nesting limit of 128, so deep nesting
    // is an error, not a stack overflow). An array would also satisfy the derived struct visitor,
    // hence the explicit object check.
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        RequestError::new(
            RequestErrorKind::MalformedJson,
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(RequestError::new(
            RequestErrorKind::MalformedJson,
            format!("request body must be a JSON object, not {}", kind(&value)),
        ));
    }
    let raw: RawRequest = serde_json::from_slice(body)
        .map_err(|e| RequestError::new(RequestErrorKind::InvalidRequest, format!("{e}")))?;

    let intent = match raw.intent {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::String(_)) | None => {
            return Err(RequestError::new(
                RequestErrorKind::InvalidRequest,
                "`intent` is required",
            ));
        }
        Some(v) => {
            return Err(RequestError::new(
                RequestErrorKind::InvalidRequest,
                format!("`intent` must be a string, not {}", kind(&v)),
            ));
        }
    };
    if !valid_intent_name(&intent) {
        return Err(RequestError::new(
            RequestErrorKind::InvalidRequest,
            format!(
                "invalid intent name {:?}: use 1-{MAX_INTENT_LEN} characters from A-Z a-z 0-9 . _ -",
                echo(&intent)
            ),
        ));
    }

    let ttl = match raw.ttl {
        None => None,
        Some(Value::String(s)) => {
            if s.chars().count() > ECHO_MAX {
                return Err(RequestError::new(
                    RequestErrorKind::InvalidTtl,
                    format!("invalid ttl {:?}", echo(&s)),
                ));
            }
            Some(parse_duration(&s).map_err(|e| {
                RequestError::new(RequestErrorKind::InvalidTtl, format!("ttl: {e}"))
            })?)
        }
        Some(v) => {
            return Err(RequestError::new(
                RequestErrorKind::InvalidTtl,
                format!("invalid ttl {}: give a string such as \"5m\"", echo(&v.to_string())),
            ));
        }
    };

    let pid = match raw.pid {
        None => None,
        Some(v) => Some(parse_pid(&v)?),
    };
    let pid_start_time = match raw.pid_start_time {
        None => None,
        Some(_) if pid.is_none() => {
            return Err(RequestError::new(
                RequestErrorKind::InvalidPid,
                "`pid_start_time` is only valid together with `pid`",
            ));
        }
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            RequestError::new(
                RequestErrorKind::InvalidPid,
                format!(
                    "invalid pid_start_time {}: give the clock ticks of /proc/PID/stat field 22",
                    echo(&v.to_string())
                ),
            )
        })?),
    };
    Ok(GrantRequest { intent, ttl, pid, pid_start_time })
}

/// pid_t is i32: anything above i32::MAX would turn negative in the syscalls, where -1 means
/// "every process" to kill(2).
fn parse_pid(v: &Value) -> Result<u32, RequestError> {
    let bad = |why: &str| {
        RequestError::new(
            RequestErrorKind::InvalidPid,
            format!("invalid pid {}: {why}", echo(&v.to_string())),
        )
    };
    match v.as_u64() {
        Some(0) => Err(bad("must be a positive integer")),
        Some(n) if n <= i32::MAX as u64 => Ok(n as u32),
        Some(_) => Err(bad("out of range")),
        None => Err(bad("must be a positive integer")),
    }
}

/// `[A-Za-z0-9._-]{1,128}`: no separators, spaces or control bytes, so names are safe in
/// paths, logs and token claims.
pub fn valid_intent_name(s: &str) -> bool {
    (1..=MAX_INTENT_LEN).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn echo(s: &str) -> String {
    if s.chars().count() <= ECHO_MAX {
        s.to_string()
    } else {
        let mut cut: String = s.chars().take(ECHO_MAX).collect();
        cut.push('…');
        cut
    }
}

/// The TTL a grant gets: the intent's default when none was asked for; a request above the
/// intent's max_ttl is clamped (never widened) and the second value explains the clamp.
pub fn resolve_ttl(intent: &Intent, requested: Option<Duration>) -> (Duration, Option<String>) {
    match requested {
        // min(): a config whose default exceeds its max must still not widen.
        None => (intent.default_ttl.min(intent.max_ttl), None),
        Some(d) if d > intent.max_ttl => (
            intent.max_ttl,
            Some(format!(
                "requested {}, clamped to intent max_ttl {}",
                format_duration(d),
                format_duration(intent.max_ttl)
            )),
        ),
        Some(d) => (d, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> GrantRequest {
        parse(body.as_bytes()).unwrap_or_else(|e| panic!("{body:?} rejected: {e}"))
    }

    #[test]
    fn good_bodies() {
        let cases: &[(&str, &str, Option<u64>, Option<u32>)] = &[
            (r#"{"intent":"deploy"}"#, "deploy", None, None),
            (r#"{"intent":"deploy","ttl":"5m"}"#, "deploy", Some(300), None),
            (
                r#" {"pid": 123, "intent": "a.b_c-D9", "ttl": "1h 30m"} "#,
                "a.b_c-D9",
                Some(5400),
                Some(123),
            ),
            (r#"{"intent":"x","ttl":null,"pid":null}"#, "x", None, None),
            (r#"{"intent":"x","pid":2147483647}"#, "x", None, Some(i32::MAX as u32)),
            ("{\n\"intent\":\"x\"\n}", "x", None, None),
        ];
        for (body, intent, ttl, pid) in cases {
            let r = ok(body);
            assert_eq!(r.intent, *intent, "{body}");
            assert_eq!(r.ttl, ttl.map(Duration::from_secs), "{body}");
            assert_eq!(r.pid, *pid, "{body}");
        }
        let long = "a".repeat(128);
        assert_eq!(ok(&format!(r#"{{"intent":"{long}"}}"#)).intent, long);
    }

    #[test]
    fn bad_bodies() {
        let deep =
            format!(r#"{{"intent":"x","ttl":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
        let long = format!(r#"{{"intent":"{}"}}"#, "a".repeat(129));
        let cases: Vec<(&[u8], &str)> = vec![
            (b"", "malformed_json"),
            (b"{", "malformed_json"),
            (b"not json", "malformed_json"),
            (b"[\"deploy\", null, null]", "malformed_json"),
            (b"\"deploy\"", "malformed_json"),
            (b"null", "malformed_json"),
            (b"{\"intent\":\"\xff\"}", "malformed_json"),
            (b"{\"intent\":\"x\"} trailing", "malformed_json"),
            (deep.as_bytes(), "malformed_json"),
            (br#"{"intent":"x","pid":1e400}"#, "malformed_json"),
            (b"{}", "invalid_request"),
            (br#"{"intent":""}"#, "invalid_request"),
            (br#"{"intent":null}"#, "invalid_request"),
            (br#"{"intent":5}"#, "invalid_request"),
            (br#"{"intent":["x"]}"#, "invalid_request"),
            (br#"{"intent":"x","extra":1}"#, "invalid_request"),
            (br#"{"intent":"x","intent":"y"}"#, "invalid_request"),
            (br#"{"intent":"de\u0000ploy"}"#, "invalid_request"),
            (br#"{"intent":"../etc"}"#, "invalid_request"),
            (br#"{"intent":"a b"}"#, "invalid_request"),
            (br#"{"intent":"d\u00e9ploy"}"#, "invalid_request"),
            (long.as_bytes(), "invalid_request"),
            (br#"{"intent":"x","ttl":"0s"}"#, "invalid_ttl"),
            (br#"{"intent":"x","ttl":"-5m"}"#, "invalid_ttl"),
            (br#"{"intent":"x","ttl":""}"#, "invalid_ttl"),
            (br#"{"intent":"x","ttl":"5 parsecs"}"#, "invalid_ttl"),
            (br#"{"intent":"x","ttl":300}"#, "invalid_ttl"),
            (br#"{"intent":"x","ttl":"99999999999999999999999h"}"#, "invalid_ttl"),
            (br#"{"intent":"x","pid":0}"#, "invalid_pid"),
            (br#"{"intent":"x","pid":-1}"#, "invalid_pid"),
            (br#"{"intent":"x","pid":1.5}"#, "invalid_pid"),
            (br#"{"intent":"x","pid":"123"}"#, "invalid_pid"),
            (br#"{"intent":"x","pid":4294967296}"#, "invalid_pid"),
            (br#"{"intent":"x","pid":2147483648}"#, "invalid_pid"),
            (br#"{"intent":"x","pid":99999999999999999999999999}"#, "invalid_pid"),
        ];
        for (body, code) in cases {
            let e = parse(body).expect_err(&String::from_utf8_lossy(body));
            assert_ne!(e.kind, RequestErrorKind::TooLarge);
            assert_eq!(e.code(), code, "{}: {e}", String::from_utf8_lossy(body));
            assert!(e.message.len() < 400, "message echoes too much: {e}");
        }
    }

    #[test]
    fn messages_are_specific() {
        let e = parse(b"{\"intent\": \n x}").unwrap_err();
        assert!(e.message.contains("line 2 column 2"), "{e}");
        let e = parse(br#"{"intent":"x","ttl":"-5m"}"#).unwrap_err();
        assert!(e.message.contains("-5m"), "{e}");
        let e = parse(br#"{"intent":"x","intent":"y"}"#).unwrap_err();
        assert!(e.message.contains("duplicate field"), "{e}");
        let e = parse(br#"{"intent":"x","pid":4294967296}"#).unwrap_err();
        assert!(e.message.contains("4294967296"), "{e}");
    }

    #[test]
    fn body_size_limit() {
        let pad = " ".repeat(MAX_BODY);
        let e = parse(format!(r#"{{"intent":"x"}}{pad}"#).as_bytes()).unwrap_err();
        assert_eq!((e.kind, e.code()), (RequestErrorKind::TooLarge, "body_too_large"));
        // Exactly at the limit is fine.
        let body = r#"{"intent":"x"}"#.to_string();
        let padded = format!("{body}{}", " ".repeat(MAX_BODY - body.len()));
        assert_eq!(ok(&padded).intent, "x");
    }

    fn intent(max: u64, default: u64) -> Intent {
        Intent {
            name: "deploy".into(),
            agents: vec![],
            secrets: vec![],
            destinations: vec![],
            max_ttl: Duration::from_secs(max),
            default_ttl: Duration::from_secs(default),
            on_violation: Default::default(),
            revoke_on_violation: false,
            aws: None,
            audiences: vec![],
            spiffe_id: None,
        }
    }

    #[test]
    fn ttl_resolution() {
        let i = intent(900, 300);
        assert_eq!(resolve_ttl(&i, None), (Duration::from_secs(300), None));
        assert_eq!(resolve_ttl(&i, Some(Duration::from_secs(60))), (Duration::from_secs(60), None));
        assert_eq!(
            resolve_ttl(&i, Some(Duration::from_secs(900))),
            (Duration::from_secs(900), None)
        );
        let (d, note) = resolve_ttl(&i, Some(Duration::from_secs(7200)));
        assert_eq!(d, Duration::from_secs(900));
        assert_eq!(note.as_deref(), Some("requested 2h, clamped to intent max_ttl 15m"));
        // A default above max never widens.
        assert_eq!(resolve_ttl(&intent(60, 300), None).0, Duration::from_secs(60));
    }
}
