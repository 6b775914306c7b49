//! `cargo xtask run [-- ARGS...]`: build, then exec `enforcer daemon ARGS...` as root.

use crate::{build, is_root, on_path, show};
use anyhow::{Result, bail};
use std::os::unix::process::CommandExt;
use std::process::Command;

pub fn run(args: &[String]) -> Result<()> {
    let built = build::run(true)?;
    let mut c = if is_root() {
        Command::new(&built.enforcer)
    } else if let Some(sudo) = on_path("sudo") {
        println!("run: not root, re-executing through sudo");
        let mut c = Command::new(sudo);
        c.arg("-E").arg(&built.enforcer);
        c
    } else {
        bail!(
            "run: the daemon must run as root and sudo is not available; run `cargo xtask run` as root"
        );
    };
    c.arg("daemon").args(args);
    println!("$ {}", show(&c));
    let err = c.exec();
    bail!("run: cannot exec `{}`: {err}", show(&c))
}
