//! `tether-gateway`: the backend-cloud side of tether.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tether_config::gateway::{GatewayConfig, GatewayFile};
use tether_gateway::live::LiveRoutes;
use tether_gateway::preflight::{self, Level};
use tether_gateway::{cilium, wireguard};
use tether_proto::ids::RegionId;

/// The tether gateway: runs in a backend Kubernetes cluster next to Cilium,
/// peers with the brokers over WireGuard and routes the site prefixes of its
/// region into the backend network.
#[derive(Debug, Parser)]
#[command(name = "tether-gateway", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: `text`, or `json` for one JSON object per line (the
    /// message in its `message` field).
    #[arg(
        long,
        global = true,
        env = tether_shell::logging::FORMAT_ENV,
        default_value = "text",
        value_name = "text|json"
    )]
    log_format: tether_shell::logging::LogFormat,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Configuration file (embedded defaults without it).
    #[arg(long, short, env = "TETHER_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: WireGuard peer of the broker, TUN device, site
    /// routes in its own table.
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the gateway's WireGuard public key (creating the key on first
    /// use), to register in the broker's [[gateway]] entry.
    Key {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Report conflicts with Cilium and the node's routing on this host.
    Preflight {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print a CiliumCIDRGroup per live site, and an example
    /// CiliumNetworkPolicy.
    Cilium {
        #[command(flatten)]
        config: ConfigArg,
        /// Namespace of the example policy.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Region whose sites the example policy allows (default: the
        /// gateway's).
        #[arg(long)]
        region: Option<RegionId>,
        /// apiVersion of the CiliumCIDRGroup resources (cilium.io/v2 on
        /// Cilium 1.18 and later).
        #[arg(long, default_value = cilium::CIDR_GROUP_API)]
        api_version: String,
    },
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
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The file to check, as `-c` (kept for scripts that name it so).
        #[arg(hide = true, conflicts_with = "config")]
        file: Option<PathBuf>,
    },
    /// Print the embedded defaults as a configuration file.
    Defaults,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    tether_shell::logging::init(format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            tether_shell::logging::fatal(format, "tether-gateway", &e);
            ExitCode::FAILURE
        }
    }
}

fn load(arg: &ConfigArg) -> anyhow::Result<GatewayConfig> {
    let (file, origin) = file(arg)?;
    Ok(file.validate(&origin)?)
}

fn file(arg: &ConfigArg) -> anyhow::Result<(GatewayFile, String)> {
    Ok(match &arg.config {
        Some(path) => (GatewayFile::load(path)?, path.display().to_string()),
        None => (GatewayFile::default(), "embedded defaults".to_string()),
    })
}

/// The embedded defaults as a configuration file, every field shown.
fn defaults_toml() -> String {
    tether_config::to_toml(&GatewayFile {
        state_dir: Some(PathBuf::from(wireguard::DEFAULT_STATE_DIR)),
        ..GatewayFile::default()
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            let (file, origin) = file(&config)?;
            let config = file.validate_for_run(&origin)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let shutdown = async move {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                };
                wireguard::run(config, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Key { config } => {
            let config = load(&config)?;
            let dir = wireguard::state_dir(&config);
            let (key, created) = wireguard::load_key(&dir)?;
            if created {
                eprintln!(
                    "Created the gateway's WireGuard key in {}",
                    dir.join(wireguard::KEY_FILE).display()
                );
            }
            println!("{}", tether_pki::wg::encode(&key.public()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Preflight { config } => {
            let config = load(&config)?;
            let resolved = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(wireguard::resolve_brokers(&config));
            let findings = preflight::analyze(&config, &preflight::gather(&config, &resolved));
            for f in &findings {
                println!("{:<5} {:<14} {}", f.level.as_str(), f.check, f.detail);
            }
            let worst = findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
            Ok(if worst == Level::Fail {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Cilium {
            config,
            namespace,
            region,
            api_version,
        } => {
            let config = load(&config)?;
            let dir = wireguard::state_dir(&config);
            let live = LiveRoutes::load(&dir)?;
            println!(
                "# {} site routes of gateway {} (region {}), from broker {}, received {} s ago",
                live.routes.len(),
                live.gateway,
                live.region,
                live.broker,
                live.age_secs()
            );
            print!("{}", cilium::cidr_groups(&live.routes, &api_version));
            // The LANs behind the sites are named in the mesh zone the
            // gateway keeps next to its routes.
            let zone_path = dir.join(wireguard::ZONE_FILE);
            match std::fs::read(&zone_path)
                .ok()
                .and_then(|b| tether_proto::dns::ZoneData::decode(&b).ok())
            {
                Some(zone) => {
                    print!(
                        "{}",
                        cilium::lan_groups(&live.routes, &zone.sites, &api_version)
                    );
                }
                None => println!(
                    "# no mesh zone in {} yet: the groups of mapped LANs are left out",
                    zone_path.display()
                ),
            }
            print!(
                "{}",
                cilium::example_policy(&namespace, region.as_ref().unwrap_or(&live.region))
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check { config, file },
        } => {
            let file = config
                .or(file)
                .context("name the file to check: tether-gateway config check -c FILE")?;
            let origin = file.display().to_string();
            GatewayFile::load(&file)
                .and_then(|f| f.validate_for_run(&origin))
                .with_context(|| format!("{origin} is not valid"))?;
            println!("{origin}: ok");
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Defaults,
        } => {
            print!("{}", defaults_toml());
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn checked_file(args: &[&str]) -> Option<PathBuf> {
        match Cli::try_parse_from(args).map(|c| c.command) {
            Ok(Command::Config {
                command: ConfigCommand::Check { config, file },
            }) => config.or(file),
            _ => None,
        }
    }

    #[test]
    fn config_check_takes_the_file_with_c() {
        let path = Some(PathBuf::from("gw.toml"));
        assert_eq!(
            checked_file(&["tether-gateway", "config", "check", "-c", "gw.toml"]),
            path
        );
        assert_eq!(
            checked_file(&["tether-gateway", "config", "check", "--config", "gw.toml"]),
            path
        );
        assert_eq!(
            checked_file(&["tether-gateway", "config", "check", "gw.toml"]),
            path
        );
    }

    #[test]
    fn defaults_show_the_state_dir() {
        let text = defaults_toml();
        assert!(
            text.contains("state_dir = \"/var/lib/tether-gateway\""),
            "{text}"
        );
        assert!(GatewayFile::parse(&text, "defaults").is_ok());
    }
}
