//! Config/policy text: load_str must never panic, whatever the TOML. Errors must be positioned.
#![no_main]

use enforcer::policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match policy::load_str("fuzz.toml", text) {
        Ok(cfg) => {
            // Validation guarantees these; the mint relies on them.
            for i in &cfg.intents {
                assert!(!i.default_ttl.is_zero() && i.default_ttl <= i.max_ttl, "{}", i.name);
            }
        }
        Err(diags) => {
            assert!(!diags.0.is_empty());
            for d in &diags.0 {
                assert!(d.line >= 1 && d.col >= 1, "{d}");
            }
            let _ = diags.to_string();
        }
    }
});
