//! `tether-broker`: the cloud side of tether.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tether_config::broker::BrokerFile;
use tether_pki::{Ca, TrustDomain};

/// The tether broker: sites dial out to it over mTLS (HTTP/3, HTTP/2); it
/// assigns them addresses from the operator's own pools and routes traffic
/// between sites and gateways.
#[derive(Debug, Parser)]
#[command(name = "tether-broker", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (tunnel listeners, admin API, DNS).
    Run {
        /// Configuration file; without it the embedded defaults apply
        /// (loopback only, a data directory under your home or /var/lib).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Manage the certificate authority.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Check or print configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create the CA (ECDSA P-256) in the data directory. Refuses to
    /// overwrite an existing CA.
    Init {
        /// Configuration file to take data_dir and trust_domain from.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data directory (overrides the configuration).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Trust domain of site identities (overrides the configuration),
        /// e.g. tether.example.org.
        #[arg(long)]
        trust_domain: Option<String>,
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
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tether-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_file(path: Option<&PathBuf>) -> anyhow::Result<BrokerFile> {
    Ok(match path {
        Some(path) => BrokerFile::load(path)?,
        None => BrokerFile::default(),
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { .. } => {
            eprintln!("tether-broker run: the tunnel listener is not available in this build yet");
            Ok(ExitCode::from(2))
        }
        Command::Pki {
            command:
                PkiCommand::Init {
                    config,
                    data_dir,
                    trust_domain,
                },
        } => {
            let file = load_file(config.as_ref())?;
            let data_dir = data_dir
                .or(file.data_dir.clone())
                .unwrap_or_else(tether_broker::paths::default_data_dir);
            let trust_domain = TrustDomain::new(trust_domain.unwrap_or(file.trust_domain))?;
            let ca = Ca::init(&data_dir, trust_domain, SystemTime::now())
                .with_context(|| format!("failed to create the CA in {}", data_dir.display()))?;
            println!(
                "Created the tether CA for trust domain {} in {}",
                ca.trust_domain(),
                data_dir.display()
            );
            println!(
                "  certificate: {}",
                data_dir.join(tether_pki::ca::CA_CERT_FILE).display()
            );
            println!(
                "  private key: {} (mode 0600; back it up, keep it secret)",
                data_dir.join(tether_pki::ca::CA_KEY_FILE).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let origin = file.display().to_string();
            BrokerFile::load(&file)?.validate(&origin)?;
            println!("{origin}: ok");
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Defaults,
        } => {
            print!("{}", BrokerFile::default().to_toml());
            Ok(ExitCode::SUCCESS)
        }
    }
}
