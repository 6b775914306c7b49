//! The Mint API's error: HTTP status, stable machine code, human message, sent as
//! `{"error": {"code": .., "message": ..}}` (docs/contracts.md, Mint API). The only place where the
//! mint's errors become HTTP.
use std::fmt;

use serde_json::Value;

use crate::mint::error::MintError;
use crate::mint::request::{RequestError, RequestErrorKind};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(403, code, message)
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(404, code, message)
    }
    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(413, code, message)
    }

    pub fn to_json(&self) -> Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let status = match e.kind {
            RequestErrorKind::TooLarge => 413,
            RequestErrorKind::MalformedJson
            | RequestErrorKind::InvalidRequest
            | RequestErrorKind::InvalidTtl
            | RequestErrorKind::InvalidPid => 400,
        };
        ApiError::new(status, e.code(), e.message)
    }
}

impl From<MintError> for ApiError {
    fn from(e: MintError) -> Self {
        let (status, code) = match &e {
            MintError::Request(r) => return r.clone().into(),
            MintError::InvalidTtl(_) => (400, "invalid_ttl"),
            MintError::InvalidPid(_) => (400, "invalid_pid"),
            MintError::AttestationFailed(_) => (403, "attestation_failed"),
            MintError::SubjectGone(_) => (403, "subject_gone"),
            MintError::NotYourProcess(_) => (403, "not_your_process"),
            MintError::NotYourGrant(_) => (403, "not_your_grant"),
            MintError::NoAgents(_) => (403, "no_agents"),
            MintError::AgentNotAllowed(_) => (403, "agent_not_allowed"),
            MintError::UnknownIntent(_) => (404, "unknown_intent"),
            MintError::NoSuchProcess(_) => (404, "no_such_process"),
            MintError::UnknownGrant(_) => (404, "unknown_grant"),
            MintError::NotActive { .. } => (409, "not_active"),
            MintError::TooManyGrants(_) => (409, "too_many_grants"),
            MintError::RateLimited { .. } => (429, "rate_limited"),
            MintError::QuotaExceeded(_) => (429, "quota_exceeded"),
            MintError::Internal(_) => (500, "internal"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mint::model::GrantState;

    #[test]
    fn error_json_shape() {
        let e = ApiError::forbidden("no_agents", "nobody");
        assert_eq!(
            e.to_json(),
            serde_json::json!({"error": {"code": "no_agents", "message": "nobody"}})
        );
    }

    #[test]
    fn mint_errors_map_to_status_and_code() {
        let cases: Vec<(MintError, u16, &str, &str)> = vec![
            (
                RequestError::new(RequestErrorKind::TooLarge, "big").into(),
                413,
                "body_too_large",
                "big",
            ),
            (
                RequestError::new(RequestErrorKind::MalformedJson, "x").into(),
                400,
                "malformed_json",
                "x",
            ),
            (
                MintError::InvalidTtl("ttl out of range".into()),
                400,
                "invalid_ttl",
                "ttl out of range",
            ),
            (
                MintError::UnknownIntent("nope".into()),
                404,
                "unknown_intent",
                "no intent named \"nope\"",
            ),
            (MintError::UnknownGrant("g_x".into()), 404, "unknown_grant", "no grant g_x"),
            (
                MintError::NotActive { id: "g_x".into(), state: GrantState::Revoked },
                409,
                "not_active",
                "grant g_x is revoked",
            ),
            (MintError::TooManyGrants("full".into()), 409, "too_many_grants", "full"),
            (
                MintError::RateLimited { uid: 7, retry: std::time::Duration::from_millis(20) },
                429,
                "rate_limited",
                "too many grant requests from uid 7; retry in 20 ms",
            ),
            (MintError::SubjectGone("gone".into()), 403, "subject_gone", "gone"),
            (MintError::Internal("boom".into()), 500, "internal", "boom"),
        ];
        for (e, status, code, message) in cases {
            let a = ApiError::from(e);
            assert_eq!((a.status, a.code, a.message.as_str()), (status, code, message));
        }
    }
}
