use std::process::ExitCode;
pub fn run(_json: bool) -> anyhow::Result<ExitCode> { todo!() }
