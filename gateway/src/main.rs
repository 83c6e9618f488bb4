//! `tether-gateway`: the backend-cloud side of tether.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether_config::gateway::GatewayFile;

/// The tether gateway: runs in a backend Kubernetes cluster next to Cilium,
/// peers with the brokers over WireGuard and routes the site prefixes of its
/// region into the backend network.
#[derive(Debug, Parser)]
#[command(name = "tether-gateway", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (WireGuard peer, TUN device, routes, DNS).
    Run {
        /// Configuration file (embedded defaults without it).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Report conflicts with Cilium and the node's routing on this host.
    Preflight,
    /// Print CiliumCIDRGroup resources for the live sites.
    Cilium,
    /// Check or print configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file and report every problem.
    Check {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the embedded defaults as a configuration file.
    Defaults,
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
            eprintln!("tether-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn not_available(what: &str) -> ExitCode {
    eprintln!("tether-gateway {what}: not available in this build yet");
    ExitCode::from(2)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { .. } => Ok(not_available("run")),
        Command::Preflight => Ok(not_available("preflight")),
        Command::Cilium => Ok(not_available("cilium")),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let origin = file.display().to_string();
            GatewayFile::load(&file)?.validate(&origin)?;
            println!("{origin}: ok");
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Defaults,
        } => {
            print!("{}", toml_of(&GatewayFile::default()));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn toml_of(file: &GatewayFile) -> String {
    tether_config::to_toml(file)
}
