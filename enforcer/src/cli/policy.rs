use std::path::PathBuf;
use std::process::ExitCode;
pub fn check(_paths: &[PathBuf]) -> anyhow::Result<ExitCode> { todo!() }
