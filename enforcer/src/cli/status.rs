use std::process::ExitCode;
pub fn run(_json: bool, _rd: Option<std::path::PathBuf>) -> anyhow::Result<ExitCode> { todo!() }
