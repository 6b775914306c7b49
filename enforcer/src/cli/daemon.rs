use std::process::ExitCode;
pub fn run(_config: Option<std::path::PathBuf>) -> anyhow::Result<ExitCode> { todo!() }
