use std::process::ExitCode;
pub fn run(_f: bool, _s: Option<String>, _fmt: &str, _sd: Option<std::path::PathBuf>) -> anyhow::Result<ExitCode> { todo!() }
