//! Grant tokens (compact JWS, EdDSA): `verify_with_jwk` must never panic, whatever the token.
//!
//! The first input byte picks the mode:
//! - even: the rest is a token string, verified as given (form, base64, header, kid, signature);
//! - odd: the rest is a claims payload, signed here with the fixed key, so the fuzzer reaches
//!   the code behind the signature check: a correctly signed token must verify exactly when its
//!   payload is valid claims JSON.
#![no_main]

use std::sync::LazyLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signer, SigningKey};
use enforcer::mint::token::{self, Claims, TokenError};
use libfuzzer_sys::fuzz_target;

const KID: &str = "fuzz-kid";

static KEY: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::from_bytes(&[7; 32]));
static JWKS: LazyLock<serde_json::Value> = LazyLock::new(|| {
    let x = B64.encode(KEY.verifying_key().as_bytes());
    serde_json::json!({"keys": [
        {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": KID, "alg": "EdDSA", "use": "sig"}
    ]})
});

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_750_000_000, 0).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        let Ok(tok) = std::str::from_utf8(rest) else { return };
        match token::verify_with_jwk(tok, &JWKS, now()) {
            Ok(v) => assert_eq!(v.expired, now().timestamp() >= v.claims.exp),
            Err(e) => {
                assert!(!e.code().is_empty());
                let _ = e.to_string();
            }
        }
        return;
    }
    let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": KID}).to_string();
    let mut tok = B64.encode(header);
    tok.push('.');
    tok.push_str(&B64.encode(rest));
    let sig = KEY.sign(tok.as_bytes());
    tok.push('.');
    tok.push_str(&B64.encode(sig.to_bytes()));
    let claims = serde_json::from_slice::<Claims>(rest);
    match token::verify_with_jwk(&tok, &JWKS, now()) {
        Ok(v) => {
            assert_eq!(Some(&v.claims), claims.as_ref().ok());
            assert_eq!(v.expired, now().timestamp() >= v.claims.exp);
        }
        Err(TokenError::TooLarge(n)) => assert!(n > token::MAX_TOKEN_BYTES),
        Err(TokenError::BadJson("payload", _)) => assert!(claims.is_err()),
        // An empty payload makes an empty middle part.
        Err(TokenError::Malformed(_)) => assert!(rest.is_empty()),
        Err(e) => panic!("signed token rejected: {e}"),
    }
});
