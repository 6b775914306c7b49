//! JWT-SVIDs as the SPIFFE JWT-SVID standard defines them: a compact JWS, header
//! `{"alg":"ES256","kid":..,"typ":"JWT"}`, claims `sub` (the SPIFFE ID), `aud`, `exp`, `iat`,
//! `iss`, `jti`, plus `grant_id` and `intent` so every token traces back to its grant.
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::keys::{KeyRing, SigningKey, verify};

/// SVIDs are well under 1 KiB; the bound keeps a hostile input cheap.
pub const MAX_SVID_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SvidClaims {
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub iss: String,
    pub jti: String,
    /// The grant this token was issued under.
    pub grant_id: String,
    pub intent: String,
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'a str,
    kid: &'a str,
    typ: &'a str,
}

/// What an SVID is issued for: the caller's grant, and the audiences it asked for.
pub struct Issue<'a> {
    pub spiffe_id: &'a str,
    pub audiences: &'a [String],
    pub issuer: &'a str,
    pub grant_id: &'a str,
    pub intent: &'a str,
    pub now: DateTime<Utc>,
    /// min(grant expiry, now + svid_ttl): never later than the grant.
    pub expires_at: DateTime<Utc>,
}

/// Signs a JWT-SVID with the current key. Returns the token and its claims.
pub fn issue(key: &SigningKey, i: &Issue<'_>) -> anyhow::Result<(String, SvidClaims)> {
    let mut jti = [0u8; 16];
    getrandom::fill(&mut jti).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
    let claims = SvidClaims {
        sub: i.spiffe_id.to_string(),
        aud: i.audiences.to_vec(),
        // exp is whole seconds: round down, so the token never outlives the grant.
        exp: i.expires_at.timestamp(),
        iat: i.now.timestamp(),
        iss: i.issuer.to_string(),
        jti: hex::encode(jti),
        grant_id: i.grant_id.to_string(),
        intent: i.intent.to_string(),
    };
    let header = serde_json::to_vec(&Header { alg: "ES256", kid: &key.kid, typ: "JWT" })?;
    let signing_input =
        format!("{}.{}", B64.encode(header), B64.encode(serde_json::to_vec(&claims)?));
    let sig = key.sign(signing_input.as_bytes())?;
    Ok((format!("{signing_input}.{}", B64.encode(sig)), claims))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSvid {
    #[error("token too large ({0} bytes, limit {MAX_SVID_BYTES})")]
    TooLarge(usize),
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("unsupported alg {0:?}: only ES256 is issued here")]
    Alg(String),
    #[error("unsupported typ {0:?}")]
    Typ(String),
    #[error("key id {0:?} is not in the bundle")]
    UnknownKid(String),
    #[error("signature does not verify")]
    Signature,
    #[error("token expired at {0}")]
    Expired(i64),
    #[error("audience {0:?} is not among the token's audiences")]
    Audience(String),
    #[error("subject {0:?} is not a SPIFFE ID of trust domain {1}")]
    Subject(String, String),
}

#[derive(Deserialize)]
struct HeaderIn {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

/// Checks a JWT-SVID against the bundle (`keys`) for `audience`: form, alg, kid, signature,
/// expiry, audience and subject. Returns the SPIFFE ID and every claim.
pub fn validate(
    keys: &KeyRing,
    trust_domain: &str,
    token: &str,
    audience: &str,
    now: DateTime<Utc>,
) -> Result<(String, serde_json::Map<String, Value>), InvalidSvid> {
    if token.len() > MAX_SVID_BYTES {
        return Err(InvalidSvid::TooLarge(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(InvalidSvid::Malformed("expected three dot-separated parts"));
    };
    let header: HeaderIn = B64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(InvalidSvid::Malformed("header is not base64url JSON"))?;
    if header.alg != "ES256" {
        return Err(InvalidSvid::Alg(header.alg));
    }
    if header.crit.is_some() {
        return Err(InvalidSvid::Malformed("crit header is not supported"));
    }
    if let Some(t) = header.typ.filter(|t| t != "JWT" && t != "JOSE") {
        return Err(InvalidSvid::Typ(t));
    }
    let kid = header.kid.ok_or(InvalidSvid::Malformed("no kid"))?;
    let public = keys.public_key(&kid).ok_or(InvalidSvid::UnknownKid(kid))?;
    let sig = B64.decode(s).map_err(|_| InvalidSvid::Malformed("signature is not base64url"))?;
    if !verify(&public, format!("{h}.{c}").as_bytes(), &sig) {
        return Err(InvalidSvid::Signature);
    }
    let claims: serde_json::Map<String, Value> = B64
        .decode(c)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(InvalidSvid::Malformed("claims are not a base64url JSON object"))?;
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or(InvalidSvid::Malformed("no numeric exp"))?;
    if exp <= now.timestamp() {
        return Err(InvalidSvid::Expired(exp));
    }
    let auds: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(v)) => v.iter().filter_map(Value::as_str).collect(),
        _ => return Err(InvalidSvid::Malformed("no aud")),
    };
    if !auds.contains(&audience) {
        return Err(InvalidSvid::Audience(audience.to_string()));
    }
    let sub = claims.get("sub").and_then(Value::as_str).unwrap_or_default().to_string();
    let in_domain = sub
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.strip_prefix(trust_domain))
        .is_some_and(crate::policy::valid_path);
    if !in_domain {
        return Err(InvalidSvid::Subject(sub, trust_domain.to_string()));
    }
    Ok((sub, claims))
}

/// JSON -> protobuf Struct value (ValidateJWTSVIDResponse.claims).
pub fn to_proto(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => {
            Kind::ListValue(prost_types::ListValue { values: a.iter().map(to_proto).collect() })
        }
        Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn to_struct(o: &serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct { fields: o.iter().map(|(k, v)| (k.clone(), to_proto(v))).collect() }
}
