//! `cargo xtask test [-- ARGS...]`: build, then every workspace test, one thread at a time
//! (the integration tests share the kernel). ARGS go to the test harness.

use crate::{build, cmd, root, run_step};
use anyhow::Result;
use std::time::Instant;

pub fn run(args: &[String]) -> Result<()> {
    let t0 = Instant::now();
    let result = (|| {
        let built = build::run(true)?;
        let mut c = cmd("cargo");
        c.current_dir(root())
            .env("ENFORCER_BIN", &built.enforcer)
            .env("ENFORCER_BPF_OBJ", &built.bpf_obj)
            .args(["test", "--release", "--workspace", "--", "--test-threads=1"])
            .args(args);
        run_step("test: cargo test", &mut c)
    })();
    let secs = t0.elapsed().as_secs_f64();
    match &result {
        Ok(()) => println!("test: all passed, total {secs:.1}s"),
        Err(_) => println!("test: FAILED after {secs:.1}s"),
    }
    result
}
