//! Command line: one file per subcommand.
mod credential;
mod daemon;
mod detach;
mod doctor;
mod events;
mod grant;
mod policy;
mod report;
mod run;
mod run_env;
mod secret;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "enforcer",
    version,
    about = "Short-lived, intent-scoped credentials, enforced by eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent in the foreground.
    Daemon {
        /// Config file (default /etc/enforcer/enforcer.toml; the embedded default when absent).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Remove the kernel programs and maps a stopped daemon left pinned (refused while a
    /// daemon runs). Stopping the daemon keeps them, so enforcement survives restarts.
    Detach {
        /// Config file naming pin_dir and runtime_dir (default /etc/enforcer/enforcer.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// What this host supports, each program type tried by a real load.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Daemon health and counters; exits non-zero when no daemon answers.
    Status {
        #[arg(long)]
        json: bool,
        /// Runtime directory holding mint.sock (default from /etc/enforcer/enforcer.toml or /run/enforcer).
        #[arg(long)]
        runtime_dir: Option<PathBuf>,
    },
    /// Read the event/alert stream stored by the daemon.
    Events {
        #[arg(long)]
        follow: bool,
        /// Only events newer than this (e.g. 10m, 2h).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value = "json")]
        format: String,
        /// State directory holding events.jsonl (default from the config or /var/lib/enforcer).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Request, list, revoke and verify grants.
    Grant {
        #[command(subcommand)]
        command: GrantCommand,
    },
    /// Run CMD holding a grant for INTENT bound to its process subtree; revoked when it exits.
    Run {
        #[arg(long)]
        intent: String,
        #[arg(long)]
        ttl: Option<String>,
        /// VAR=secret:NAME: set VAR to the daemon-held secret NAME (fetched by CMD's own
        /// process once it holds the grant, before CMD starts). Repeatable.
        #[arg(long = "env", value_name = "VAR=secret:NAME")]
        env: Vec<String>,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Brokered cloud credentials for a process holding a grant (credential_process).
    Credential {
        #[command(subcommand)]
        command: CredentialCommand,
    },
    /// Daemon-held static secrets, delivered to processes holding a grant that covers them.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Reports over the stored events (census of credential use).
    Report {
        #[command(subcommand)]
        command: ReportCommand,
    },
    /// Validate configuration and policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum GrantCommand {
    /// Ask the daemon for a grant (for this process, or --pid PID).
    Request {
        #[arg(long)]
        intent: String,
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// List active grants (--all: every grant in the ledger).
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        all: bool,
    },
    /// Revoke a grant now.
    Revoke { id: String },
    /// Check a grant token's signature and expiry against the daemon's key.
    Verify { token: String },
}

#[derive(Subcommand, Debug)]
pub enum CredentialCommand {
    /// Print AWS credentials as credential_process JSON (Version 1) for the caller's live
    /// grant of INTENT (an intent with [intent.aws]).
    Aws {
        #[arg(long)]
        intent: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Print a daemon-held secret's value (the caller must hold a grant covering it).
    Get { name: String },
}

#[derive(Subcommand, Debug)]
pub enum ReportCommand {
    /// Per credential: jobs, executables, destinations, grant coverage, and a least-privilege intent.
    Census {
        /// Only events newer than this (e.g. 24h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// json, markdown or sarif (SARIF 2.1.0, for code scanning).
        #[arg(long, default_value = "json")]
        format: String,
        /// State directory holding events.jsonl (default from the config or /var/lib/enforcer).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Write the report to this file instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Check config/policy files; errors as file:line:col: message.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Ask the running daemon to reload its policy (an invalid one is refused and kept out).
    Reload,
}

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Daemon { config } => daemon::run(config),
        Command::Detach { config } => detach::run(config),
        Command::Doctor { json } => doctor::run(json),
        Command::Status { json, runtime_dir } => status::run(json, runtime_dir),
        Command::Events { follow, since, format, state_dir } => {
            events::run(follow, since, &format, state_dir)
        }
        Command::Policy { command: PolicyCommand::Check { paths } } => policy::check(&paths),
        Command::Policy { command: PolicyCommand::Reload } => policy::reload(),
        Command::Report { command: ReportCommand::Census { since, format, state_dir, output } } => {
            report::census(since, &format, state_dir, output)
        }
        Command::Grant { command } => match command {
            GrantCommand::Request { intent, ttl, pid, json } => {
                grant::request(&intent, ttl, pid, json)
            }
            GrantCommand::List { json, all } => grant::list(json, all),
            GrantCommand::Revoke { id } => grant::revoke(&id),
            GrantCommand::Verify { token } => grant::verify(&token),
        },
        Command::Run { intent, ttl, env, cmd } => run::run(&intent, ttl, &env, &cmd),
        Command::Credential { command: CredentialCommand::Aws { intent } } => {
            credential::aws(&intent)
        }
        Command::Secret { command: SecretCommand::Get { name } } => secret::get(&name),
    }
}
