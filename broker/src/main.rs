//! `tether-broker`: the cloud side of tether.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tether_broker::run::{ADMIN_TOKEN_FILE, data_dir};
use tether_config::broker::{BrokerConfig, BrokerFile};
use tether_pki::{Ca, TrustDomain};
use tether_proto::api::{
    FleetSession, ReleaseResponse, RevokeResponse, RouteInfo, SiteInfo, TokenRequest, TokenResponse,
};
use tether_proto::ids::{RegionId, SiteId};
use tether_shell::operator::{self, AdminClient};

/// The tether broker: sites dial out to it over mTLS (HTTP/3); it assigns
/// them addresses from the operator's own pools and routes traffic between
/// sites and gateways.
#[derive(Debug, Parser)]
#[command(name = "tether-broker", version, propagate_version = true)]
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
    /// Configuration file; without it the embedded defaults apply (loopback
    /// only; data directory /var/lib/tether-broker as root, else
    /// ~/.local/state/tether-broker).
    #[arg(long, short, env = "TETHER_BROKER_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker: tunnel listener, admin API, local gateway.
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Sites.
    Site {
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// List sites, their addresses and sessions; in a fleet, a site
    /// connected to another live broker is connected, with that broker.
    Sites {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the admin API's token from the data directory (`admin.token`),
    /// for the CLI elsewhere (TETHER_ADMIN_TOKEN) and the console: in an
    /// image without a shell, `kubectl exec` runs this instead of `cat`.
    AdminToken {
        /// Print the read-only viewer token (`viewer.token`) instead.
        #[arg(long)]
        viewer: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List live sessions: in a fleet, those of every live broker, each
    /// with the broker holding it.
    Sessions {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List routes; in a fleet, also those through another broker (over
    /// the broker-to-broker link), with that broker.
    Routes {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List gateways and the state of their tunnels.
    Gateways {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Gateways over WireGuard.
    Gateway {
        #[command(subcommand)]
        command: GatewayCommand,
    },
    /// Manage the certificate authority.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// The CA: its rotation phase and trust bundle; rotate it in steps
    /// that can be undone.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Write a backup of the running broker's state (the embedded store,
    /// with the CA and its keys) to a file, mode 0600, through the admin
    /// API. With etcd, use `etcdctl snapshot save` instead.
    Backup {
        /// The file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Restore a backup into an empty data directory, after checking it
    /// is complete and unaltered; then start a broker on that directory.
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// The data directory to restore into (its store must not exist).
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Check or print configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The state store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy an embedded store (store.redb) into the etcd cluster of a
    /// configuration: sites, certificates, leases, revocations and
    /// unexpired tokens, so no site enrolls again. Stop the broker first.
    Migrate {
        /// The embedded store file, e.g. /var/lib/tether-broker/store.redb.
        #[arg(long)]
        from: PathBuf,
        /// A broker configuration with `[store] backend = "etcd"`.
        #[arg(long)]
        to_config: PathBuf,
        /// Delete whatever the etcd prefix already holds, then copy.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a one-time enrollment token for a site (registers the site).
    Create {
        /// Site id, unique across the deployment (e.g. hospital-a).
        #[arg(long)]
        site: SiteId,
        /// Region of the site (data residency).
        #[arg(long)]
        region: RegionId,
        /// How long the token stays valid (default: the broker's token_ttl).
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
enum SiteCommand {
    /// Render everything one edge cluster needs for a new site: the
    /// agent's Kubernetes manifests with the site's values, its
    /// configuration, and a Secret with a fresh one-time enrollment code
    /// (created as `token create` does, registering the site).
    Bundle {
        /// Site id, unique across the deployment (e.g. hospital-a).
        #[arg(long)]
        site: SiteId,
        /// Region of the site (data residency).
        #[arg(long)]
        region: RegionId,
        /// Directory to write the bundle to (created; must be empty).
        #[arg(long)]
        out: PathBuf,
        /// Layout: a kustomize directory, or one manifest file.
        #[arg(long, value_enum, default_value = "kustomize")]
        format: tether_broker::bundle::Format,
        /// Broker endpoints the site dials (host[:port], repeatable).
        /// Default: the broker's `advertised` names and addresses with its
        /// tunnel port, as its admin API reports them; name the public port
        /// when the broker listens on another one behind a load balancer.
        #[arg(long = "broker")]
        brokers: Vec<String>,
        /// The agent's container image.
        #[arg(long, default_value = concat!("tether:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// How long the enrollment code stays valid (default: the broker's
        /// token_ttl).
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke a site: its live tunnel is closed and it cannot reconnect.
    Revoke {
        /// Site id.
        #[arg(long)]
        site: SiteId,
        /// Region of the site.
        #[arg(long)]
        region: RegionId,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Free the addresses and LAN mappings of a revoked site for other
    /// sites (kept until then, so a re-admitted site gets them back).
    Release {
        /// Site id.
        #[arg(long)]
        site: SiteId,
        /// Region of the site.
        #[arg(long)]
        region: RegionId,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
enum GatewayCommand {
    /// Print the broker's WireGuard public key (creating the key on first
    /// use), for the gateways' broker_public_key.
    Key {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print a wg-quick configuration with which a stock WireGuard peer
    /// stands in for a registered gateway.
    WgQuick {
        /// The gateway id, as registered in a [[gateway]] entry.
        #[arg(long)]
        id: tether_proto::ids::GatewayId,
        /// Where the peer keeps its private key (`wg genkey`); the file is
        /// referenced, never read.
        #[arg(long, default_value = "/etc/wireguard/tether.key")]
        private_key_file: PathBuf,
        /// Routing table for the pools (clear of Cilium's).
        #[arg(long, default_value_t = 7300)]
        table: u32,
        /// Priority of the rule that looks the table up.
        #[arg(long, default_value_t = 7300)]
        rule_priority: u32,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create the CA (ECDSA P-256) in the data directory. Refuses to
    /// overwrite an existing CA. (`run` does this on first start.)
    Init {
        #[command(flatten)]
        config: ConfigArg,
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
enum CaCommand {
    /// Show the rotation phase, the trust bundle and the next step.
    Status {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// One rotation step forward: stable → prepared (a new CA is made and
    /// published in the trust bundle; the old one still signs) → active
    /// (the new CA signs; both are trusted) → stable again with the old
    /// CA retired (allowed once its site certificates have expired).
    Rotate {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// One rotation step back: active → prepared (the old CA signs again),
    /// prepared → stable (the new CA is dropped). A retired CA cannot come
    /// back.
    Rollback {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Write a new key-encryption key (32 random bytes, base64) to a new
    /// file, mode 0600, for `[ca] key_encryption_key_file` or `ca rekey`.
    NewKek {
        /// The file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Encrypt the CA keys in the store with another key-encryption key.
    /// Reads the store directly: with the embedded store, stop the broker
    /// first. With the default key file (data_dir/ca-kek) the file is
    /// replaced too; else put the new file in place of the configured one
    /// on every broker.
    Rekey {
        /// The new key-encryption key file (`ca new-kek`).
        #[arg(long)]
        new_kek: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
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
    // Before any thread starts: fewer malloc arenas keep less freed memory
    // (see tether_broker::memory).
    tether_broker::memory::limit_arenas();
    let cli = Cli::parse();
    let format = cli.log_format;
    tether_shell::logging::init(format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            tether_shell::logging::fatal(format, "tether-broker", &e);
            ExitCode::FAILURE
        }
    }
}

fn load(arg: &ConfigArg) -> anyhow::Result<(BrokerFile, BrokerConfig)> {
    let (file, origin) = match &arg.config {
        Some(path) => (BrokerFile::load(path)?, path.display().to_string()),
        None => (BrokerFile::default(), "embedded defaults".to_string()),
    };
    let config = file.validate(&origin)?;
    Ok((file, config))
}

/// The broker's WireGuard key, created in its data directory if missing.
fn wireguard_key(config: &BrokerConfig) -> anyhow::Result<tether_pki::wg::WgKey> {
    let (key, _, _) = tether_broker::wireguard::load_key(config, &data_dir(config))?;
    Ok(key)
}

/// The admin API client for the broker the configuration describes.
fn admin(arg: &ConfigArg) -> anyhow::Result<AdminClient> {
    let (_, config) = load(arg)?;
    let url = std::env::var("TETHER_ADMIN_URL")
        .unwrap_or_else(|_| format!("http://{}", config.admin_listen));
    let token = match std::env::var("TETHER_ADMIN_TOKEN") {
        Ok(t) => t,
        Err(_) => {
            let path = data_dir(&config).join(ADMIN_TOKEN_FILE);
            std::fs::read_to_string(&path).with_context(|| {
                format!("cannot read the admin token {} (run as the broker's user, or set TETHER_ADMIN_TOKEN)", path.display())
            })?
        }
    };
    Ok(AdminClient::new(&url, &token))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config: arg } => {
            let (_, config) = load(&arg)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(config, arg.config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    site,
                    region,
                    ttl,
                    config,
                },
        } => {
            let created: TokenResponse =
                admin(&config)?.post("/v1/tokens", &TokenRequest { site, region, ttl })?;
            let expires = humantime::format_rfc3339_seconds(tether_pki::token::from_unix_secs(
                created.expires_at,
            ));
            println!(
                "Enrollment token for site {} in region {} (valid until {expires}, single use):",
                created.site, created.region
            );
            println!();
            println!("  {}", created.code);
            println!();
            println!("On the site, run:");
            println!("  {}", created.enroll_command);
            Ok(ExitCode::SUCCESS)
        }
        Command::Site {
            command:
                SiteCommand::Release {
                    site,
                    region,
                    config,
                },
        } => {
            let r: ReleaseResponse = admin(&config)?.post(
                &format!("/v1/sites/{region}/{site}/release"),
                &serde_json::json!({}),
            )?;
            if r.released.is_empty() {
                println!("Site {} in region {} held no addresses.", r.site, r.region);
            } else {
                let list: Vec<String> = r.released.iter().map(ToString::to_string).collect();
                println!(
                    "Released {} prefixes of site {} in region {}: {}",
                    list.len(),
                    r.site,
                    r.region,
                    list.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Site {
            command:
                SiteCommand::Revoke {
                    site,
                    region,
                    config,
                },
        } => {
            let r: RevokeResponse = admin(&config)?.post(
                &format!("/v1/sites/{region}/{site}/revoke"),
                &serde_json::json!({}),
            )?;
            println!(
                "Site {} in region {} is revoked{}.",
                r.site,
                r.region,
                if r.closed_session {
                    "; its tunnel was closed"
                } else {
                    " (it was not connected)"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Site {
            command:
                SiteCommand::Bundle {
                    site,
                    region,
                    out,
                    format,
                    brokers,
                    image,
                    ttl,
                    config,
                },
        } => {
            let (_, broker_config) = load(&config)?;
            if let Some(bad) = brokers
                .iter()
                .find(|b| tether_config::Endpoint::parse(b, 443).is_none())
            {
                anyhow::bail!(
                    "--broker {bad:?} is not a broker address: write host, host:port, [v6] or [v6]:port"
                );
            }
            if out.exists()
                && std::fs::read_dir(&out)
                    .with_context(|| format!("cannot read {}", out.display()))?
                    .next()
                    .is_some()
            {
                anyhow::bail!(
                    "{} is not empty: give a new directory for the bundle",
                    out.display()
                );
            }
            let created: TokenResponse =
                admin(&config)?.post("/v1/tokens", &TokenRequest { site, region, ttl })?;
            // The broker that created the code knows its own endpoints and
            // published CIDR: the bundle works off-cluster against the
            // admin API (TETHER_ADMIN_URL) with no copy of its
            // configuration. A broker predating those fields leaves them
            // empty, and the local configuration stands in.
            let brokers = if !brokers.is_empty() {
                brokers
            } else if !created.brokers.is_empty() {
                created.brokers.clone()
            } else {
                site_endpoints(&broker_config)
            };
            if brokers.is_empty() {
                anyhow::bail!(
                    "the broker advertises no address, so the bundle would name none \
                     (the code just created stays unused and expires): pass --broker <host[:port]>"
                );
            }
            let published_cidr = if created.published_cidr.is_empty() {
                broker_config.published_cidr.to_string()
            } else {
                created.published_cidr.clone()
            };
            let expires = humantime::format_rfc3339_seconds(tether_pki::token::from_unix_secs(
                created.expires_at,
            ))
            .to_string();
            let bundle = tether_broker::bundle::Site {
                site: created.site.to_string(),
                region: created.region.to_string(),
                code: created.code,
                expires: expires.clone(),
                brokers,
                published_cidr,
                image,
            };
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            for (name, text) in tether_broker::bundle::render(&bundle, format) {
                let path = out.join(&name);
                std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            println!(
                "Bundle for site {} in region {} in {} (enrollment code valid until {expires}, single use).",
                bundle.site,
                bundle.region,
                out.display()
            );
            println!("  brokers      {}", bundle.brokers.join(", "));
            println!(
                "The Secret in it holds the enrollment code: encrypt it before it goes into a repository."
            );
            println!(
                "Apply with: kubectl apply {} {}",
                match format {
                    tether_broker::bundle::Format::Kustomize => "-k",
                    tether_broker::bundle::Format::Manifests => "-f",
                },
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::AdminToken { viewer, config } => {
            let (_, config) = load(&config)?;
            let name = if viewer {
                tether_broker::run::VIEWER_TOKEN_FILE
            } else {
                ADMIN_TOKEN_FILE
            };
            let path = data_dir(&config).join(name);
            let token = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "cannot read {} (the broker creates it on its first start; run as the broker's user)",
                    path.display()
                )
            })?;
            println!("{}", token.trim());
            Ok(ExitCode::SUCCESS)
        }
        Command::Sites { config } => {
            let sites: Vec<SiteInfo> = admin(&config)?.get("/v1/sites")?;
            print!("{}", operator::sites_table(&sites));
            Ok(ExitCode::SUCCESS)
        }
        Command::Sessions { config } => {
            let sessions: Vec<FleetSession> = admin(&config)?.get("/v1/sessions")?;
            print!("{}", operator::sessions_table(&sessions));
            Ok(ExitCode::SUCCESS)
        }
        Command::Routes { config } => {
            let routes: Vec<RouteInfo> = admin(&config)?.get("/v1/routes")?;
            print!("{}", operator::routes_table(&routes));
            Ok(ExitCode::SUCCESS)
        }
        Command::Gateways { config } => {
            let gateways: Vec<tether_proto::api::GatewayInfo> =
                admin(&config)?.get("/v1/gateways")?;
            print!("{}", operator::gateways_table(&gateways));
            Ok(ExitCode::SUCCESS)
        }
        Command::Gateway {
            command: GatewayCommand::Key { config },
        } => {
            let (_, config) = load(&config)?;
            let key = wireguard_key(&config)?;
            println!("{}", tether_pki::wg::encode(&key.public()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Gateway {
            command:
                GatewayCommand::WgQuick {
                    id,
                    private_key_file,
                    table,
                    rule_priority,
                    config,
                },
        } => {
            let (_, config) = load(&config)?;
            let key = wireguard_key(&config)?;
            print!(
                "{}",
                tether_broker::wireguard::wg_quick_config(
                    &config,
                    &id,
                    &key.public(),
                    &private_key_file,
                    table,
                    rule_priority
                )?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki {
            command:
                PkiCommand::Init {
                    config,
                    data_dir: dir,
                    trust_domain,
                },
        } => {
            let file = match &config.config {
                Some(path) => BrokerFile::load(path)?,
                None => BrokerFile::default(),
            };
            let dir = dir
                .or(file.data_dir.clone())
                .unwrap_or_else(tether_broker::paths::default_data_dir);
            let trust_domain = TrustDomain::new(trust_domain.unwrap_or(file.trust_domain))?;
            let ca = Ca::init(&dir, trust_domain, SystemTime::now())
                .with_context(|| format!("failed to create the CA in {}", dir.display()))?;
            println!(
                "Created the tether CA for trust domain {} in {}",
                ca.trust_domain(),
                dir.display()
            );
            println!(
                "  certificate: {}",
                dir.join(tether_pki::ca::CA_CERT_FILE).display()
            );
            println!(
                "  private key: {} (mode 0600, in clear: the broker imports it into its store, encrypted, at its first start; delete the file then)",
                dir.join(tether_pki::ca::CA_KEY_FILE).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup { out, config } => {
            let backup: tether_broker::backup::Backup = admin(&config)?.get("/v1/backup")?;
            let text = serde_json::to_vec(&backup)?;
            tether_pki::ca::write_new_file(&out, &text, 0o600)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "Wrote {} ({} bytes, SHA-256 of the content {}). The CA's private keys in it are encrypted with the key-encryption key: keep that key apart from the backup (a restore needs both).",
                out.display(),
                text.len(),
                backup.content_sha256
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore { from, data_dir } => {
            let restored = tether_broker::backup::restore(&from, &data_dir)
                .with_context(|| format!("cannot restore {}", from.display()))?;
            println!(
                "Restored into {}: {} sites, {} address leases, {} unused enrollment tokens{}.",
                data_dir.display(),
                restored.sites,
                restored.leases,
                restored.tokens,
                if restored.ca { ", the CA" } else { "" }
            );
            println!("Point the broker's data_dir at it and start it.");
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command: CaCommand::NewKek { out },
        } => {
            let kek = tether_pki::kek::Kek::generate(&out)?;
            kek.write_new()?;
            println!(
                "Wrote a new key-encryption key to {} (mode 0600, id {}). Keep a copy apart from the broker's backups: a restore needs both.",
                out.display(),
                kek.id()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command: CaCommand::Rekey { new_kek, config },
        } => {
            let (_, config) = load(&config)?;
            let dir = data_dir(&config);
            let old_path = tether_broker::authority::kek_path(&config, &dir);
            let old = tether_pki::kek::Kek::load(&old_path)?;
            let new = tether_pki::kek::Kek::load(&new_kek)?;
            let store = tether_broker::store::open(&config.store, &dir)?;
            let count = tether_broker::authority::rekey(&*store, &old, &new)
                .context("cannot encrypt the CA keys with the new key-encryption key")?;
            drop(store);
            println!(
                "CA keys in the store: {count}, now encrypted with key-encryption key {} ({}).",
                new.id(),
                new_kek.display()
            );
            if config.ca_kek_file.is_none() {
                tether_pki::ca::replace_file(&old_path, new.file_text().as_bytes(), 0o600)
                    .with_context(|| format!("cannot replace {}", old_path.display()))?;
                println!("Replaced {} with it.", old_path.display());
            } else {
                println!(
                    "Now copy it over {} on every broker (mode 0600); a running broker reads the file again at the next CA change.",
                    old_path.display()
                );
            }
            println!(
                "Backups taken before hold the keys under the old key-encryption key: keep it as long as them."
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command: CaCommand::Status { config },
        } => {
            let status = admin(&config)?.get("/v1/ca")?;
            print!("{}", ca_status_text(&status));
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command: CaCommand::Rotate { config },
        } => {
            let status = admin(&config)?.post("/v1/ca/rotate", &serde_json::json!({}))?;
            print!("{}", ca_status_text(&status));
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca {
            command: CaCommand::Rollback { config },
        } => {
            let status = admin(&config)?.post("/v1/ca/rollback", &serde_json::json!({}))?;
            print!("{}", ca_status_text(&status));
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
        Command::Store {
            command:
                StoreCommand::Migrate {
                    from,
                    to_config,
                    force,
                },
        } => {
            let origin = to_config.display().to_string();
            let config = BrokerFile::load(&to_config)?.validate(&origin)?;
            let tether_config::broker::StoreConfig::Etcd(etcd) = &config.store else {
                anyhow::bail!(
                    "{origin} does not use etcd: set [store] backend = \"etcd\" and [store.etcd] endpoints"
                );
            };
            if from.is_dir() {
                anyhow::bail!(
                    "{} is a directory: name the store file in it, {}",
                    from.display(),
                    from.join(tether_broker::store::EMBEDDED_FILE).display()
                );
            }
            if !from.is_file() {
                anyhow::bail!("{} does not exist or is not a file", from.display());
            }
            let kek_path = config
                .ca_kek_file
                .clone()
                .context("the configuration names no [ca] key_encryption_key_file")?;
            let kek = match tether_pki::kek::Kek::load(&kek_path) {
                Err(tether_pki::kek::KekError::Missing(_)) => anyhow::bail!(
                    "{} does not exist: the brokers on etcd open the CA keys with it; copy the key-encryption key of the embedded store ({}) there first (mode 0600)",
                    kek_path.display(),
                    from.with_file_name(tether_config::broker::DEFAULT_KEK_FILE)
                        .display()
                ),
                other => other?,
            };
            let report = tether_broker::store::migrate(&from, etcd, &kek, force, SystemTime::now())
                .with_context(|| format!("migration from {} failed", from.display()))?;
            println!("{report}");
            println!();
            println!("Point every broker's configuration at etcd ({origin}) and start them.");
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Defaults,
        } => {
            print!("{}", BrokerFile::defaults_toml());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A Unix time as an RFC 3339 UTC date.
fn unix_time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// The CA state in plain words.
fn ca_status_text(status: &tether_proto::api::CaStatus) -> String {
    let mut out = format!(
        "CA rotation phase: {} (step {}, since {})\n",
        status.phase,
        status.generation,
        unix_time(status.since)
    );
    for ca in &status.bundle {
        out.push_str(&format!(
            "  {} {}  pin {}  expires {}\n",
            if ca.signing { "signing:" } else { "trusted:" },
            ca.name,
            ca.pin,
            unix_time(ca.not_after)
        ));
    }
    if let Some(at) = status.retire_after {
        out.push_str(&format!(
            "The old CA can be retired from {}.\n",
            unix_time(at)
        ));
    }
    if let Some(at) = status.drop_next_after {
        out.push_str(&format!(
            "The new CA can be dropped from {}.\n",
            unix_time(at)
        ));
    }
    out.push_str(&format!("Next: {}\n", status.next_step));
    out
}

/// The broker endpoints a site dials, from the configuration: the
/// advertised addresses and names with the first tunnel port (no port when
/// it is 443).
fn site_endpoints(config: &BrokerConfig) -> Vec<String> {
    let port = config.listen.first().map(|a| a.port()).unwrap_or(443);
    let with_port = |host: String| {
        if port == 443 {
            host
        } else {
            format!("{host}:{port}")
        }
    };
    let mut out: Vec<String> = config
        .advertised_names
        .iter()
        .map(|n| with_port(n.clone()))
        .collect();
    out.extend(config.advertised_ips.iter().map(|ip| match ip {
        std::net::IpAddr::V6(v6) => with_port(format!("[{v6}]")),
        std::net::IpAddr::V4(v4) => with_port(v4.to_string()),
    }));
    out
}

/// The command that creates an enrollment token for the broker started
/// with the configuration file `path`: without `-c` it would talk to the
/// defaults' data directory instead.
fn token_create(path: Option<&std::path::Path>, region: &str) -> String {
    let config = match path {
        Some(p) => format!(" -c {}", shell_word(&p.display().to_string())),
        None => String::new(),
    };
    format!("tether-broker token create{config} --site <site-id> --region {region}")
}

/// `word` quoted for a POSIX shell when it needs to be.
fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+,:=@%".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// Raises the soft open-file limit to the hard one: every tunnel, admin
/// and DNS connection holds a descriptor, and distributions start
/// services with a soft limit of 1024.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        },
        Ok((soft, _)) => tracing::debug!(limit = soft, "open-file limit"),
        Err(e) => tracing::debug!(error = %e, "cannot read the open-file limit"),
    }
}

async fn serve(config: BrokerConfig, path: Option<PathBuf>) -> anyhow::Result<()> {
    raise_open_file_limit();
    let running = tether_broker::run::start(config.clone()).await?;
    // Before the banner: whoever waits for it may signal at once.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let dir = data_dir(&config);
    let region = config
        .regions
        .keys()
        .next()
        .map(|r| r.to_string())
        .unwrap_or_default();
    let endpoint = running
        .broker
        .enroll_endpoints()
        .into_iter()
        .next()
        .unwrap_or_default();
    if running.created {
        println!(
            "Created a new CA, store and admin token in {}",
            dir.display()
        );
    }
    println!("tether broker is running");
    println!("  trust domain  {}", config.trust_domain);
    for addr in &running.tunnel_addrs {
        println!("  tunnel        {addr} (UDP, HTTP/3 CONNECT-IP)");
    }
    println!(
        "  admin API     http://{} (token in {})",
        running.admin_addr,
        dir.join(ADMIN_TOKEN_FILE).display()
    );
    println!(
        "  console       http://{}/console/ (read-only token in {})",
        running.admin_addr,
        dir.join(tether_broker::run::VIEWER_TOKEN_FILE).display()
    );
    for addr in &running.dns_addrs {
        println!(
            "  DNS           {addr} (UDP and TCP, zone {}; try: dig @{} -p {} <site>.{region}.{})",
            config.dns_zone,
            addr.ip(),
            addr.port(),
            config.dns_zone
        );
    }
    if let Some(gw) = &config.local_gateway {
        println!("  local gateway {} (region {})", gw.tun_name, gw.region);
    }
    if let Some(wg) = running.broker.plane().wireguard() {
        for addr in wg.local_addrs() {
            println!(
                "  wireguard     {addr} (UDP, {} gateways; public key {})",
                wg.peers().len(),
                tether_pki::wg::encode(&wg.public_key())
            );
        }
    }
    println!();
    println!("Enroll a site:");
    println!(
        "  1. here:        {}",
        token_create(path.as_deref(), &region)
    );
    println!("  2. on the site: tether enroll --broker {endpoint} --token <code from step 1>");
    println!("                  tether up");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let drain = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break Duration::ZERO,
            _ = term.recv() => break running.broker.config.drain_timeout,
            _ = hangup.recv() => match &path {
                // The access policy is reloaded; everything else needs a
                // restart.
                Some(path) => match tether_broker::access::reload(&running.broker, path) {
                    Ok(rules) => tracing::info!(rules, file = %path.display(), "access policy reloaded"),
                    Err(e) => tracing::error!("access policy not reloaded, the previous one stays in force: {e:#}"),
                },
                None => tracing::warn!("SIGHUP ignored: the broker runs on its embedded defaults, there is no file to reload"),
            },
        }
    };
    tracing::info!("shutting down");
    running.handover(drain).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let low = hard.min(512) / 2;
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        raise_open_file_limit();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    }

    #[test]
    fn ca_status_says_the_phase_the_bundle_and_when_the_old_ca_may_go() {
        let status = tether_proto::api::CaStatus {
            phase: "active".into(),
            generation: 2,
            since: 0,
            bundle: vec![
                tether_proto::api::CaInfo {
                    name: "tether CA t 2222".into(),
                    pin: "pin2".into(),
                    signing: true,
                    not_after: 86_400,
                },
                tether_proto::api::CaInfo {
                    name: "tether CA t 1111".into(),
                    pin: "pin1".into(),
                    signing: false,
                    not_after: 86_400,
                },
            ],
            retire_after: Some(3600),
            drop_next_after: None,
            next_step: "rotate: retire".into(),
        };
        let text = ca_status_text(&status);
        assert!(
            text.starts_with("CA rotation phase: active (step 2, since 1970-01-01T00:00:00Z)"),
            "{text}"
        );
        assert!(
            text.contains("  signing: tether CA t 2222  pin pin2"),
            "{text}"
        );
        assert!(
            text.contains("  trusted: tether CA t 1111  pin pin1"),
            "{text}"
        );
        assert!(
            text.contains("The old CA can be retired from 1970-01-01T01:00:00Z."),
            "{text}"
        );
        assert!(text.ends_with("Next: rotate: retire\n"), "{text}");
    }

    #[test]
    fn the_banner_names_the_configuration_file() {
        assert_eq!(
            token_create(None, "eu"),
            "tether-broker token create --site <site-id> --region eu"
        );
        assert_eq!(
            token_create(Some(std::path::Path::new("/etc/tether/broker.toml")), "eu"),
            "tether-broker token create -c /etc/tether/broker.toml --site <site-id> --region eu"
        );
        assert_eq!(
            token_create(Some(std::path::Path::new("my broker.toml")), "eu"),
            "tether-broker token create -c 'my broker.toml' --site <site-id> --region eu"
        );
    }
}
