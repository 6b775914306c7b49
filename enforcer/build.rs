//! Embeds the eBPF object built by `cargo xtask build` (env ENFORCER_BPF_OBJ).
//! Without it (plain `cargo build`/`cargo test`), an empty object is embedded and the
//! daemon refuses to start with a message pointing at `cargo xtask build`.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=ENFORCER_BPF_OBJ");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("enforcer.bpf.o");
    match env::var("ENFORCER_BPF_OBJ") {
        Ok(path) if !path.is_empty() => {
            println!("cargo:rerun-if-changed={path}");
            fs::copy(&path, &out).unwrap_or_else(|e| panic!("copy eBPF object {path}: {e}"));
        }
        _ => fs::write(&out, b"").unwrap(),
    }
}
