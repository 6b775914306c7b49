//! Grant tokens: compact JWS signed with the host's Ed25519 key (alg "EdDSA", RFC 8037).
//!
//! The token is the portable, offline-checkable form of a grant: anyone holding the public key
//! (GET /v1/keys) can check what the daemon issued. Enforcement never trusts a token presented by
//! a process (the kernel attributes uses); the token is evidence, so verification is strict about
//! form (one algorithm, bounded size, exact kid) and lenient only about expiry, which it reports.
// Nothing outside this module calls these items yet (the Mint API wires them in).
#![allow(dead_code)]

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::model::{Grant, Subject};

pub const KEY_FILE: &str = "signing-key.ed25519";
/// Our tokens are well under 2 KiB; the bound keeps a hostile input from costing more than that.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
const ALG: &str = "EdDSA";

/// The claims of a grant token; they mirror the grant (docs/contracts.md, "Mint API").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// "pid:<pid>@<start_ns>": the kernel identity of the subject, as one string.
    pub sub: String,
    /// The grant id.
    pub jti: String,
    pub intent: String,
    pub subject: Subject,
    pub secrets: Vec<String>,
    pub destinations: Vec<String>,
    /// Unix seconds.
    pub iat: i64,
    /// Unix seconds.
    pub exp: i64,
}

/// A token whose form and signature checked out. Expired tokens verify (so a CLI can say
/// "valid signature, expired 3 min ago") but are flagged.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub claims: Claims,
    pub expired: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token too large: {0} bytes (limit {MAX_TOKEN_BYTES})")]
    TooLarge(usize),
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token {0} is not valid unpadded base64url")]
    BadBase64(&'static str),
    #[error("token {0} is not valid JSON of the expected shape: {1}")]
    BadJson(&'static str, String),
    #[error("unsupported token alg {0:?}: only EdDSA is accepted")]
    UnsupportedAlg(String),
    #[error("token key id {0:?} does not match the verification key")]
    UnknownKid(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("invalid verification key: {0}")]
    BadKey(String),
}

impl TokenError {
    /// Stable machine-readable code (API error bodies, `--json` output).
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::TooLarge(_) => "too_large",
            TokenError::Malformed(_) => "malformed",
            TokenError::BadBase64(_) => "bad_base64",
            TokenError::BadJson(..) => "bad_json",
            TokenError::UnsupportedAlg(_) => "unsupported_alg",
            TokenError::UnknownKid(_) => "unknown_kid",
            TokenError::BadSignature => "bad_signature",
            TokenError::BadKey(_) => "bad_key",
        }
    }
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'a str,
    typ: &'a str,
    kid: &'a str,
}

#[derive(Deserialize)]
struct HeaderIn {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// RFC 7515 §4.1.11: a "crit" we do not understand must make the token invalid; we
    /// understand none.
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

/// The host's token signing key.
pub struct Signer {
    key: SigningKey,
    /// The signing scalar and nonce prefix, derived from the seed once (a `SigningKey`
    /// derives them again, a SHA-512 and a scalar reduction, for every signature).
    expanded: ed25519_dalek::hazmat::ExpandedSecretKey,
    kid: String,
}

// By hand so the seed can never end up in a log line.
impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads `<state_dir>/signing-key.ed25519` (raw 32-byte seed), creating it on first start.
    pub fn load_or_create(state_dir: &Path) -> anyhow::Result<Signer> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("creating state dir {}", state_dir.display()))?;
        let path = state_dir.join(KEY_FILE);
        match open_existing(&path) {
            Ok(file) => return Self::from_file(file, &path),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        }
        // Write the new key to a private temp file, then hard-link it into place: link(2) never
        // replaces, so a concurrent starter either wins or reads the winner's complete key, and
        // nobody ever sees a half-written key file.
        let tmp = state_dir.join(format!("{KEY_FILE}.tmp.{}", std::process::id()));
        let _ = fs::remove_file(&tmp); // a leftover of a crashed start of ours, never a real key
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
        let written = (|| -> std::io::Result<()> {
            // O_EXCL + 0600 at creation: the key is never readable by anyone else, not even
            // for the moment a create-then-chmod would leave open.
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)?;
            f.write_all(&seed)?;
            f.sync_all()?;
            fs::hard_link(&tmp, &path)
        })();
        let _ = fs::remove_file(&tmp);
        match written {
            Ok(()) => {
                // Make the new directory entry durable too; best effort.
                if let Ok(d) = File::open(state_dir) {
                    let _ = d.sync_all();
                }
                Ok(Self::from_seed(&seed))
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let file =
                    open_existing(&path).with_context(|| format!("opening {}", path.display()))?;
                Self::from_file(file, &path)
            }
            Err(e) => Err(e).with_context(|| format!("creating signing key {}", path.display())),
        }
    }

    fn from_file(mut file: File, path: &Path) -> anyhow::Result<Signer> {
        // fstat the handle we read from, so the checked file is the used file.
        let meta = file.metadata().with_context(|| format!("stat {}", path.display()))?;
        if !meta.file_type().is_file() {
            bail!("signing key {} is not a regular file", path.display());
        }
        let mode = meta.mode() & 0o7777;
        if mode != 0o600 {
            bail!(
                "refusing signing key {}: mode {mode:04o}, must be 0600 (a key others could \
                 read is compromised: delete it to have a new one made)",
                path.display()
            );
        }
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != euid {
            bail!(
                "refusing signing key {}: owned by uid {}, not by uid {euid} running enforcer",
                path.display(),
                meta.uid()
            );
        }
        let mut buf = Vec::with_capacity(33);
        Read::by_ref(&mut file)
            .take(33)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        let seed: [u8; 32] = buf.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!(
                "signing key {} is {} bytes, expected a 32-byte Ed25519 seed",
                path.display(),
                buf.len()
            )
        })?;
        Ok(Self::from_seed(&seed))
    }

    fn from_seed(seed: &[u8; 32]) -> Signer {
        let key = SigningKey::from_bytes(seed);
        let kid = kid_of(&key.verifying_key());
        let expanded = ed25519_dalek::hazmat::ExpandedSecretKey::from(seed);
        Signer { key, expanded, kid }
    }

    pub fn kid(&self) -> String {
        self.kid.clone()
    }

    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": B64.encode(self.key.verifying_key().as_bytes()),
            "kid": self.kid,
            "alg": ALG,
            "use": "sig",
        })
    }

    /// Served at GET /v1/keys.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": [self.jwk()] })
    }

    /// `issuer` is "enforcer@<host>".
    pub fn sign(&self, grant: &Grant, issuer: &str) -> anyhow::Result<String> {
        let claims = Claims {
            iss: issuer.to_owned(),
            sub: format!("pid:{}@{}", grant.subject.pid, grant.subject.start_ns),
            jti: grant.id.clone(),
            intent: grant.intent.clone(),
            subject: grant.subject.clone(),
            secrets: grant.secrets.clone(),
            destinations: grant.destinations.clone(),
            iat: grant.issued_at.timestamp(),
            exp: grant.expires_at.timestamp(),
        };
        let header = HeaderOut { alg: ALG, typ: "JWT", kid: &self.kid };
        let mut out = B64.encode(serde_json::to_vec(&header)?);
        out.push('.');
        out.push_str(&B64.encode(serde_json::to_vec(&claims)?));
        // What `SigningKey::sign` computes, with the expanded key kept (RFC 8032 5.1.6).
        let sig = ed25519_dalek::hazmat::raw_sign::<sha2::Sha512>(
            &self.expanded,
            out.as_bytes(),
            &self.key.verifying_key(),
        );
        out.push('.');
        out.push_str(&B64.encode(sig.to_bytes()));
        if out.len() > MAX_TOKEN_BYTES {
            // Our own verifier would reject it: fail at issue time, not at check time.
            bail!("grant token would be {} bytes, over {MAX_TOKEN_BYTES}", out.len());
        }
        Ok(out)
    }

    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<Verified, TokenError> {
        verify_with_key(token, &self.key.verifying_key(), &self.kid, now)
    }
}

/// Verifies against a public key given as a JWK (`{"kty":"OKP",...}`) or a JWK set
/// (`{"keys":[...]}`, as served by GET /v1/keys; the key is picked by the token's kid).
pub fn verify_with_jwk(
    token: &str,
    jwk: &serde_json::Value,
    now: DateTime<Utc>,
) -> Result<Verified, TokenError> {
    let (header_b64, _) = split(token)?;
    let header = parse_header(header_b64)?;
    let jwk = match jwk.get("keys") {
        Some(keys) => {
            let keys = keys.as_array().ok_or_else(|| bad_key("\"keys\" is not an array"))?;
            let want = header.kid.as_deref().unwrap_or_default();
            keys.iter()
                .find(|k| k.get("kid").and_then(|v| v.as_str()) == Some(want))
                .ok_or_else(|| TokenError::UnknownKid(want.to_owned()))?
        }
        None => jwk,
    };
    let field = |name: &str| jwk.get(name).and_then(|v| v.as_str());
    if field("kty") != Some("OKP") || field("crv") != Some("Ed25519") {
        return Err(bad_key("not an OKP/Ed25519 key"));
    }
    if field("alg").is_some_and(|a| a != ALG) {
        return Err(bad_key("key alg is not EdDSA"));
    }
    let x = B64
        .decode(field("x").ok_or_else(|| bad_key("missing \"x\""))?)
        .map_err(|_| bad_key("\"x\" is not base64url"))?;
    let x: [u8; 32] = x.as_slice().try_into().map_err(|_| bad_key("\"x\" is not 32 bytes"))?;
    let key = VerifyingKey::from_bytes(&x).map_err(|_| bad_key("\"x\" is not a curve point"))?;
    // A JWK without a kid is trusted under the kid we would have given it.
    let kid = field("kid").map(str::to_owned).unwrap_or_else(|| kid_of(&key));
    verify_with_key(token, &key, &kid, now)
}

fn bad_key(msg: &str) -> TokenError {
    TokenError::BadKey(msg.to_owned())
}

/// First 16 hex chars of sha256(public key): stable across restarts, changes with the key.
fn kid_of(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Opens an existing file without following a symlink planted at the key path.
fn open_existing(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

/// Returns the (header, signature) parts, after the size and shape checks.
fn split(token: &str) -> Result<(&str, &str), TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge(token.len()));
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) if !h.is_empty() && !p.is_empty() && !s.is_empty() => {
            Ok((h, s))
        }
        _ => Err(TokenError::Malformed("expected three non-empty dot-separated parts")),
    }
}

fn parse_header(header_b64: &str) -> Result<HeaderIn, TokenError> {
    let raw = B64.decode(header_b64).map_err(|_| TokenError::BadBase64("header"))?;
    let header: HeaderIn =
        serde_json::from_slice(&raw).map_err(|e| TokenError::BadJson("header", e.to_string()))?;
    if header.alg != ALG {
        return Err(TokenError::UnsupportedAlg(header.alg));
    }
    if header.crit.is_some() {
        return Err(TokenError::Malformed("header has unsupported \"crit\" extensions"));
    }
    Ok(header)
}

fn verify_with_key(
    token: &str,
    key: &VerifyingKey,
    kid: &str,
    now: DateTime<Utc>,
) -> Result<Verified, TokenError> {
    let (header_b64, sig_b64) = split(token)?;
    // The JWS signing input is "header.payload": everything before the last dot.
    let signing_input = &token[..token.len() - sig_b64.len() - 1];
    let payload_b64 = &signing_input[header_b64.len() + 1..];
    let header = parse_header(header_b64)?;
    if header.kid.as_deref() != Some(kid) {
        return Err(TokenError::UnknownKid(header.kid.unwrap_or_default()));
    }
    let sig = B64.decode(sig_b64).map_err(|_| TokenError::BadBase64("signature"))?;
    let sig = Signature::from_slice(&sig).map_err(|_| TokenError::BadSignature)?;
    // verify_strict: rejects small-order keys and non-canonical signatures, so one message has
    // exactly one valid token encoding.
    key.verify_strict(signing_input.as_bytes(), &sig).map_err(|_| TokenError::BadSignature)?;
    // Only signed bytes are parsed past this point.
    let raw = B64.decode(payload_b64).map_err(|_| TokenError::BadBase64("payload"))?;
    let claims: Claims =
        serde_json::from_slice(&raw).map_err(|e| TokenError::BadJson("payload", e.to_string()))?;
    // Valid while now < exp (RFC 7519 §4.1.4).
    let expired = now.timestamp() >= claims.exp;
    Ok(Verified { claims, expired })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mint::model::GrantState;
    use std::os::unix::fs::PermissionsExt;

    use tempfile::TempDir;

    fn scratch() -> TempDir {
        tempfile::Builder::new().prefix("enforcer-mint-test-").tempdir().unwrap()
    }

    fn grant(issued: DateTime<Utc>, ttl_s: i64) -> Grant {
        Grant {
            id: "g_abcdefghijklmnopqrstuvwxyz".into(),
            intent: "deploy".into(),
            subject: Subject {
                pid: 4242,
                start_ns: 123_456_789,
                exe: "/usr/bin/deployer".into(),
                exe_sha256: "ab".repeat(32),
                uid: 1000,
                gid: 1000,
                cgroup: "/system.slice/ci.service".into(),
            },
            secrets: vec!["deploy-key".into()],
            destinations: vec!["192.0.2.10/32:443".into(), "deploy.internal:443".into()],
            issued_at: issued,
            expires_at: issued + chrono::Duration::seconds(ttl_s),
            state: GrantState::Active,
            token: String::new(),
            ttl_clamped_from: None,
        }
    }

    fn setup() -> (TempDir, Signer, Grant, String) {
        let dir = scratch();
        let signer = Signer::load_or_create(dir.path()).unwrap();
        let g = grant(Utc::now(), 300);
        let tok = signer.sign(&g, "enforcer@host1").unwrap();
        (dir, signer, g, tok)
    }

    fn b64json(v: &serde_json::Value) -> String {
        B64.encode(serde_json::to_vec(v).unwrap())
    }

    /// The kept expanded key signs exactly as `SigningKey::sign` (Ed25519 is deterministic).
    #[test]
    fn expanded_key_signs_as_the_signing_key() {
        use ed25519_dalek::Signer as _;
        let s = Signer::from_seed(&[7u8; 32]);
        for msg in [&b""[..], b"a", &[0x5a; 1500]] {
            let ours = ed25519_dalek::hazmat::raw_sign::<sha2::Sha512>(
                &s.expanded,
                msg,
                &s.key.verifying_key(),
            );
            assert_eq!(ours, s.key.sign(msg));
        }
    }

    #[test]
    fn roundtrip() {
        let (_d, signer, g, tok) = setup();
        let v = signer.verify(&tok, Utc::now()).unwrap();
        assert!(!v.expired);
        let c = v.claims;
        assert_eq!(c.jti, g.id);
        assert_eq!(c.sub, "pid:4242@123456789");
        assert_eq!(c.iss, "enforcer@host1");
        assert_eq!(c.subject, g.subject);
        assert_eq!(c.secrets, g.secrets);
        assert_eq!(c.destinations, g.destinations);
        assert_eq!(c.exp, g.expires_at.timestamp());
        // Header as specified.
        let h: serde_json::Value =
            serde_json::from_slice(&B64.decode(tok.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(h, serde_json::json!({"alg":"EdDSA","typ":"JWT","kid":signer.kid()}));
        // Same result through the published keys, as a JWK and as a JWKS.
        assert_eq!(verify_with_jwk(&tok, &signer.jwk(), Utc::now()).unwrap().claims, c);
        assert_eq!(verify_with_jwk(&tok, &signer.jwks(), Utc::now()).unwrap().claims, c);
        let jwk = signer.jwk();
        assert_eq!(jwk["kty"], "OKP");
        assert_eq!(jwk["crv"], "Ed25519");
        assert_eq!(signer.kid().len(), 16);
    }

    #[test]
    fn tampered_payload_rejected() {
        let (_d, signer, _g, tok) = setup();
        let parts: Vec<&str> = tok.split('.').collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        claims["exp"] = serde_json::json!(9_999_999_999i64);
        let forged = format!("{}.{}.{}", parts[0], b64json(&claims), parts[2]);
        assert_eq!(signer.verify(&forged, Utc::now()), Err(TokenError::BadSignature));
    }

    #[test]
    fn alg_none_and_others_rejected() {
        let (_d, signer, _g, tok) = setup();
        let parts: Vec<&str> = tok.split('.').collect();
        for alg in ["none", "HS256", "ES256", "eddsa"] {
            let h = b64json(&serde_json::json!({"alg":alg,"typ":"JWT","kid":signer.kid()}));
            // Unsigned form, and with the original signature kept.
            for forged in [format!("{h}.{}.", parts[1]), format!("{h}.{}.{}", parts[1], parts[2])] {
                let err = signer.verify(&forged, Utc::now()).unwrap_err();
                assert!(
                    matches!(err, TokenError::UnsupportedAlg(_) | TokenError::Malformed(_)),
                    "{alg}: {err:?}"
                );
            }
            let forged = format!("{h}.{}.{}", parts[1], parts[2]);
            assert_eq!(
                signer.verify(&forged, Utc::now()),
                Err(TokenError::UnsupportedAlg(alg.into()))
            );
        }
        let crit = b64json(&serde_json::json!({"alg":"EdDSA","kid":signer.kid(),"crit":["x"]}));
        let forged = format!("{crit}.{}.{}", parts[1], parts[2]);
        assert!(matches!(signer.verify(&forged, Utc::now()), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn wrong_key_rejected() {
        let (_d, _signer, _g, tok) = setup();
        let other_dir = scratch();
        let other = Signer::load_or_create(other_dir.path()).unwrap();
        assert!(matches!(other.verify(&tok, Utc::now()), Err(TokenError::UnknownKid(_))));
        assert!(matches!(
            verify_with_jwk(&tok, &other.jwks(), Utc::now()),
            Err(TokenError::UnknownKid(_))
        ));
        // The other key published under the right kid: the signature is what fails.
        let mut jwk = other.jwk();
        jwk["kid"] = serde_json::json!(_signer.kid());
        assert_eq!(verify_with_jwk(&tok, &jwk, Utc::now()), Err(TokenError::BadSignature));
    }

    #[test]
    fn malformed_rejected() {
        let (_d, signer, _g, tok) = setup();
        let now = Utc::now();
        let truncated = &tok[..tok.len() - 10];
        assert_eq!(signer.verify(truncated, now), Err(TokenError::BadSignature));
        let two_parts = &tok[..tok.rfind('.').unwrap()];
        assert!(matches!(signer.verify(two_parts, now), Err(TokenError::Malformed(_))));
        assert!(matches!(signer.verify("", now), Err(TokenError::Malformed(_))));
        assert!(matches!(signer.verify(&format!("{tok}.x"), now), Err(TokenError::Malformed(_))));
        let bad_b64 = format!("{}!{}", &tok[..5], &tok[6..]);
        assert_eq!(signer.verify(&bad_b64, now), Err(TokenError::BadBase64("header")));
        let not_json = format!("{}.{}", B64.encode(b"{nope"), tok.split_once('.').unwrap().1);
        assert!(matches!(signer.verify(&not_json, now), Err(TokenError::BadJson("header", _))));
        let huge = format!("{tok}{}", "A".repeat(MAX_TOKEN_BYTES));
        assert_eq!(signer.verify(&huge, now), Err(TokenError::TooLarge(huge.len())));
        assert_eq!(TokenError::TooLarge(1).code(), "too_large");
    }

    #[test]
    fn expired_flagged_not_rejected() {
        let (_d, signer, g, tok) = setup();
        let v = signer.verify(&tok, g.expires_at + chrono::Duration::minutes(3)).unwrap();
        assert!(v.expired);
        assert_eq!(v.claims.jti, g.id);
        // Exactly at exp it is already expired; a second before, not.
        let exp = DateTime::from_timestamp(v.claims.exp, 0).unwrap();
        assert!(signer.verify(&tok, exp).unwrap().expired);
        assert!(!signer.verify(&tok, exp - chrono::Duration::seconds(1)).unwrap().expired);
    }

    #[test]
    fn key_file_created_0600_and_reused() {
        let dir = scratch();
        let a = Signer::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!(meta.len(), 32);
        let b = Signer::load_or_create(dir.path()).unwrap();
        assert_eq!(a.kid(), b.kid());
        assert_eq!(a.jwk(), b.jwk());
        // No temp file left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // A token from the first load verifies with the second.
        let tok = a.sign(&grant(Utc::now(), 60), "enforcer@h").unwrap();
        assert!(b.verify(&tok, Utc::now()).is_ok());
        assert!(!format!("{a:?}").contains(&hex::encode(a.key.to_bytes())));
    }

    #[test]
    fn key_file_with_loose_mode_refused() {
        let dir = scratch();
        Signer::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        for mode in [0o644, 0o640, 0o400, 0o4600] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = Signer::load_or_create(dir.path()).unwrap_err().to_string();
            assert!(err.contains("must be 0600"), "{mode:o}: {err}");
        }
        // A wrong-sized key is refused, not silently replaced.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, b"short").unwrap();
        let err = Signer::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("32-byte"), "{err}");
    }

    #[test]
    fn key_symlink_refused() {
        let dir = scratch();
        fs::create_dir_all(dir.path()).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join(KEY_FILE)).unwrap();
        assert!(Signer::load_or_create(dir.path()).is_err());
    }
}
