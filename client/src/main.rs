//! `tether`: the edge agent (`enroll`, `up`, `doctor`) and the operator CLI
//! (`routes`, `sites`, `trace`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether_config::client::ClientFile;

/// tether: connects this site to the cloud by dialling out. One token, one
/// command: `tether enroll`, then `tether up`.
#[derive(Debug, Parser)]
#[command(name = "tether", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll this site with a broker using a one-time token.
    Enroll {
        /// Broker name or address (inside the published CIDR).
        #[arg(long)]
        broker: String,
        /// The enrollment token from the operator (tt1-…).
        #[arg(long)]
        token: String,
    },
    /// Connect this site and keep it connected.
    Up {
        /// Configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check why this site cannot connect, in plain words.
    Doctor,
    /// Print the one firewall rule hospital IT must allow.
    FirewallRule,
    /// List routes known to a broker (operators).
    Routes,
    /// List sites known to a broker (operators).
    Sites,
    /// Explain how a broker routes an address or name (operators).
    Trace {
        /// An IP address or a site name.
        target: String,
    },
    /// Check a configuration file and report every problem.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tether: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn not_available(what: &str) -> ExitCode {
    eprintln!("tether {what}: not available in this build yet");
    ExitCode::from(2)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    Ok(match cli.command {
        Command::Enroll { .. } => not_available("enroll"),
        Command::Up { .. } => not_available("up"),
        Command::Doctor => not_available("doctor"),
        Command::FirewallRule => not_available("firewall-rule"),
        Command::Routes => not_available("routes"),
        Command::Sites => not_available("sites"),
        Command::Trace { .. } => not_available("trace"),
        Command::CheckConfig { file } => {
            let origin = file.display().to_string();
            ClientFile::load(&file)?.validate(&origin)?;
            println!("{origin}: ok");
            ExitCode::SUCCESS
        }
    })
}
