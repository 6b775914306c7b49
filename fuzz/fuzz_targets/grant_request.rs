//! `POST /v1/grants` bodies: parse must never panic, whatever it accepts must satisfy the
//! documented invariants, and whatever it refuses must map to a 400 or 413 response.
#![no_main]

use std::time::Duration;

use enforcer::api::error::ApiError;
use enforcer::mint::request::{self, RequestErrorKind};
use enforcer::policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match request::parse(data) {
        Ok(r) => {
            assert!(data.len() <= request::MAX_BODY);
            assert!(request::valid_intent_name(&r.intent));
            assert!(r.ttl.is_none_or(|d| !d.is_zero()));
            assert!(r.pid.is_none_or(|p| p > 0 && p <= i32::MAX as u32));
            // Clamping never widens.
            let intent = policy::Intent {
                name: r.intent.clone(),
                agents: vec![],
                secrets: vec![],
                destinations: vec![],
                max_ttl: Duration::from_secs(900),
                default_ttl: Duration::from_secs(300),
                on_violation: Default::default(),
                revoke_on_violation: false,
                aws: None,
                audiences: vec![],
                spiffe_id: None,
            };
            let (ttl, note) = request::resolve_ttl(&intent, r.ttl);
            assert!(ttl <= intent.max_ttl && !ttl.is_zero());
            assert_eq!(note.is_some(), r.ttl.is_some_and(|d| d > intent.max_ttl));
        }
        Err(e) => {
            assert_eq!(e.kind == RequestErrorKind::TooLarge, data.len() > request::MAX_BODY, "{e}");
            assert!(!e.message.is_empty(), "{e}");
            // What the Mint API sends for it.
            let api = ApiError::from(e);
            assert!(matches!(api.status, 400 | 413), "{api}");
            let _ = api.to_json().to_string();
        }
    }
});
