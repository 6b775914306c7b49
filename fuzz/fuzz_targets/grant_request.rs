//! `POST /v1/grants` bodies: parse must never panic, and whatever it accepts must satisfy the
//! documented invariants.
#![no_main]
#![allow(dead_code, unused_imports)] // the included modules carry API the targets do not call

use std::time::Duration;

use libfuzzer_sys::fuzz_target;

#[path = "../../enforcer/src/policy/mod.rs"]
mod policy;
#[path = "../../enforcer/src/mint/request.rs"]
mod request;

fuzz_target!(|data: &[u8]| {
    match request::parse(data) {
        Ok(r) => {
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
            };
            let (ttl, _) = request::resolve_ttl(&intent, r.ttl);
            assert!(ttl <= intent.max_ttl && !ttl.is_zero());
        }
        Err(e) => {
            assert!(matches!(e.status, 400 | 413), "{e}");
            let _ = e.to_json().to_string();
        }
    }
});
