//! `tether`: the edge agent (`enroll`, `up`, `doctor`) and the operator CLI
//! (`routes`, `sites`, `trace`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether::state_dir::{StateDir, default_state_dir};
use tether_config::client::ClientFile;

/// tether: connects this site to the cloud by dialling out. One token, one
/// command: `tether enroll`, then `tether up`.
#[derive(Debug, Parser)]
#[command(name = "tether", version, propagate_version = true)]
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

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll this site with a broker using a one-time token.
    Enroll {
        /// Broker name or address, with :port if not 443.
        #[arg(long)]
        broker: String,
        /// The enrollment code from the operator (tt1-…).
        #[arg(long)]
        token: String,
        /// State directory (default /var/lib/tether as root).
        #[arg(long, env = "TETHER_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Enroll again even if this site is already enrolled.
        #[arg(long)]
        force: bool,
        /// HTTP proxy (http://[user:pass@]host:port) when the site may only
        /// reach out through one; kept in the configuration for `tether up`.
        /// Default: HTTPS_PROXY / https_proxy.
        #[arg(long)]
        proxy: Option<String>,
    },
    /// Connect this site and keep it connected (until SIGTERM). A site
    /// with no identity yet enrolls first when given an enrollment code
    /// (exit status 3 when the broker refuses the code).
    Up {
        /// Configuration file (default: tether.toml in the state directory).
        #[arg(long, short, env = "TETHER_CONFIG")]
        config: Option<PathBuf>,
        /// State directory (default /var/lib/tether as root).
        #[arg(long, env = "TETHER_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// The broker to enroll with on the first start (host[:port]).
        #[arg(long, env = "TETHER_BROKER")]
        broker: Option<String>,
        /// A file holding the one-time enrollment code (tt1-…), read only
        /// while the site has no identity; a missing file is no code.
        #[arg(
            long,
            env = "TETHER_ENROLL_TOKEN_FILE",
            conflicts_with = "enroll_token"
        )]
        enroll_token_file: Option<PathBuf>,
        /// The one-time enrollment code itself.
        #[arg(long, env = "TETHER_ENROLL_TOKEN", hide_env_values = true)]
        enroll_token: Option<String>,
        /// Serve /livez and /readyz (200 while the tunnel is up) on this
        /// address, e.g. 0.0.0.0:8081 for Kubernetes probes.
        #[arg(long, env = "TETHER_HEALTH_LISTEN")]
        health_listen: Option<std::net::SocketAddr>,
    },
    /// Check why this site cannot connect, in plain words (exit status 1
    /// when something blocks it).
    Doctor {
        /// Configuration file (default: tether.toml in the state directory).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// State directory (default /var/lib/tether as root).
        #[arg(long, env = "TETHER_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Print the one firewall rule hospital IT must allow.
    FirewallRule {
        /// The published CIDR (default: from this site's configuration).
        #[arg(long)]
        cidr: Option<ipnet::IpNet>,
        /// Only this format (default: all of them).
        #[arg(long, value_enum)]
        format: Option<tether::firewall::Format>,
        /// Configuration file (default: tether.toml in the state directory).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// State directory (default /var/lib/tether as root).
        #[arg(long, env = "TETHER_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// List a broker's routes, longest prefixes last (operators).
    Routes {
        /// Only routes to this site.
        #[arg(long)]
        site: Option<String>,
        /// Only routes of this region.
        #[arg(long)]
        region: Option<String>,
        /// Only routes of this kind: site-address, site-lan or gateway.
        #[arg(long)]
        kind: Option<String>,
        /// Only routes overlapping this prefix or address.
        #[arg(long)]
        prefix: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List a broker's sites with their state and addresses (operators).
    /// With --since or --state: each site's state (online, offline,
    /// flapping, revoked), since when, and its latest event.
    Sites {
        /// Only sites with an event within this duration (e.g. 10m, 1h).
        #[arg(long)]
        since: Option<String>,
        /// Only sites in this state: online, offline, flapping or revoked.
        #[arg(long)]
        state: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show a site's timeline: connections, disconnections with their
    /// reason, renewals, revocation (operators).
    Events {
        /// The site.
        site: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Explain how a broker routes an address or a site name: every
    /// candidate route, the site or gateway, its session, residency
    /// (operators). Exit code 3 when there is no route.
    Trace {
        /// An IP address, or a site name (<site>.<region>.<zone>).
        target: String,
        /// Also ask the access policy about traffic from this sender (an
        /// address or a site name); exit code 3 when it is denied.
        #[arg(long)]
        from: Option<String>,
        /// The traffic to ask about: tcp/<port>, udp/<port>, icmp, any.
        #[arg(long, default_value = "icmp", requires = "from")]
        traffic: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Check a configuration file and report every problem.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// The access policy (operators).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Check a broker configuration's [policy] (or a file holding only
    /// [policy]) before the broker loads it: every problem, with the rule
    /// and the fix.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    tether_shell::logging::init(format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            tether_shell::logging::fatal(format, "tether", &e);
            if e.downcast_ref::<tether::enroll::EnrollmentRefused>()
                .is_some()
            {
                ExitCode::from(EXIT_ENROLLMENT_REFUSED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `tether up`'s exit status when the broker refused the enrollment code:
/// restarting cannot help until the code changes.
const EXIT_ENROLLMENT_REFUSED: u8 = 3;

/// Where the broker's admin API is and how to authenticate.
#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// The broker's admin API.
    #[arg(
        long,
        env = "TETHER_ADMIN_URL",
        default_value = "http://127.0.0.1:7070"
    )]
    admin_url: String,
    /// The admin token (the broker's admin.token).
    #[arg(long, env = "TETHER_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the admin token, e.g.
    /// /var/lib/tether-broker/admin.token.
    #[arg(long, env = "TETHER_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl AdminArgs {
    fn client(&self) -> anyhow::Result<tether_shell::operator::AdminClient> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(path)) => std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read the admin token {}: {e}", path.display())
            })?,
            (None, None) => anyhow::bail!(
                "no admin token: pass --token-file /var/lib/tether-broker/admin.token (on the broker host), or set TETHER_ADMIN_TOKEN"
            ),
        };
        Ok(tether_shell::operator::AdminClient::new(
            &self.admin_url,
            &token,
        ))
    }
}

/// Runs an admin call; API failures become their exit codes.
fn operator_call(
    f: impl FnOnce() -> Result<ExitCode, tether_shell::operator::CallError>,
) -> ExitCode {
    match f() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tether: {e}");
            e.exit_code()
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("tether: {e}"),
    }
}

/// The validated configuration and the state directory it names.
fn load(
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<(tether_config::client::ClientConfig, StateDir)> {
    let state = StateDir::new(state_dir.unwrap_or_else(default_state_dir));
    let path = config.unwrap_or_else(|| state.config_path());
    if !path.exists() {
        anyhow::bail!(
            "no configuration at {}: enroll first (`tether enroll --broker <broker> --token <code>`), or pass --config",
            path.display()
        );
    }
    let config = ClientFile::load(&path)?.validate(&path.display().to_string())?;
    let state = match &config.state_dir {
        Some(dir) => StateDir::new(dir.clone()),
        None => state,
    };
    state.check_lans(&config.lans, &path.display().to_string())?;
    Ok((config, state))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread: the agent's work fits in one core, and keeping the QUIC
    // driver and the packet pumps on the same thread avoids a cross-thread
    // wakeup per batch of packets.
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    Ok(match cli.command {
        Command::Enroll {
            broker,
            token,
            state_dir,
            force,
            proxy,
        } => {
            let state = StateDir::new(state_dir.unwrap_or_else(default_state_dir));
            let enrolled = runtime()?.block_on(tether::enroll::enroll(
                &broker,
                &token,
                &state,
                force,
                proxy.as_deref(),
            ))?;
            let r = enrolled.response;
            println!("Enrolled: this site is {} in region {}.", r.site, r.region);
            println!("  identity     {}", r.identity);
            println!("  state        {}", state.path.display());
            println!("  brokers      {}", r.brokers.join(", "));
            println!("Next: run `tether up` to connect.");
            ExitCode::SUCCESS
        }
        Command::Up {
            config,
            state_dir,
            broker,
            enroll_token_file,
            enroll_token,
            health_listen,
        } => {
            let runtime = runtime()?;
            // The state directory a configuration file names wins, as in
            // `load`.
            let mut state = StateDir::new(state_dir.clone().unwrap_or_else(default_state_dir));
            if let Some(path) = config.as_ref().filter(|p| p.exists())
                && let Some(dir) = ClientFile::load(path)?.state_dir
            {
                state = StateDir::new(dir);
            }
            let first = tether::enroll::FirstStart {
                broker,
                code: enroll_token,
                code_file: enroll_token_file.clone(),
                proxy: None,
            };
            runtime
                .block_on(tether::enroll::enroll_on_first_start(&state, &first))
                .map_err(|e| match &enroll_token_file {
                    Some(path) => {
                        e.context(format!("cannot enroll with the code in {}", path.display()))
                    }
                    None => e.context("cannot enroll with the enrollment code"),
                })?;
            // The file `load` reads, read again on SIGHUP.
            let config_path = config.clone().unwrap_or_else(|| state.config_path());
            let (config, state) = load(config, Some(state.path))?;
            runtime.block_on(async move {
                let (reload, reloads) = tokio::sync::mpsc::unbounded_channel();
                let mut hangup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        tracing::info!(
                            path = %config_path.display(),
                            "SIGHUP: reading the configuration again"
                        );
                        let origin = config_path.display().to_string();
                        let read = ClientFile::load(&config_path)
                            .and_then(|f| f.validate(&origin))
                            .map_err(|e| {
                                // One line: the log and the problem report.
                                e.to_string()
                                    .lines()
                                    .map(str::trim)
                                    .collect::<Vec<_>>()
                                    .join(" ")
                            });
                        if reload.send(read).is_err() {
                            return;
                        }
                    }
                });
                let (health, health_rx) = tether::health::Reporter::new();
                if let Some(addr) = health_listen {
                    tether::health::serve(addr, health_rx).await?;
                }
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    let mut term = match tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::terminate(),
                    ) {
                        Ok(t) => t,
                        Err(_) => return,
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    tracing::info!("stopping");
                    let _ = tx.send(true);
                });
                tether::agent::run_reporting(config, state, rx, health, reloads).await
            })?;
            ExitCode::SUCCESS
        }
        Command::Doctor { config, state_dir } => {
            let (config, state) = load(config, state_dir)?;
            let report = runtime()?.block_on(tether::doctor::run(&config, &state));
            print!("{}", report.render());
            if report.blocked() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::FirewallRule {
            cidr,
            format,
            config,
            state_dir,
        } => {
            let cidr = match cidr {
                Some(c) => c,
                None => {
                    load(config, state_dir)
                        .map_err(|e| e.context("pass --cidr <published CIDR>, or enroll first"))?
                        .0
                        .published_cidr
                }
            };
            match format {
                Some(f) => print!("{}", tether::firewall::rule(cidr, f)),
                None => print!("{}", tether::firewall::all(cidr)),
            }
            ExitCode::SUCCESS
        }
        Command::Routes {
            site,
            region,
            kind,
            prefix,
            json,
            admin,
        } => {
            let client = admin.client()?;
            let mut query: Vec<String> = Vec::new();
            for (key, value) in [
                ("site", site),
                ("region", region),
                ("kind", kind),
                ("prefix", prefix),
            ] {
                if let Some(v) = value {
                    query.push(format!("{key}={}", query_escape(&v)));
                }
            }
            let path = if query.is_empty() {
                "/v1/routes".to_string()
            } else {
                format!("/v1/routes?{}", query.join("&"))
            };
            operator_call(|| {
                let routes: Vec<tether_proto::api::RouteInfo> = client.get(&path)?;
                if json {
                    print_json(&routes);
                } else {
                    print!("{}", tether_shell::operator::routes_table(&routes));
                }
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Sites {
            since: None,
            state: None,
            json,
            admin,
        } => {
            let client = admin.client()?;
            operator_call(|| {
                let sites: Vec<tether_proto::api::SiteInfo> = client.get("/v1/sites")?;
                if json {
                    print_json(&sites);
                } else {
                    print!("{}", tether_shell::operator::sites_table(&sites));
                }
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Sites {
            since,
            state,
            json,
            admin,
        } => {
            let client = admin.client()?;
            let mut filter = String::new();
            for (key, value) in [("since", since), ("state", state)] {
                if let Some(v) = value {
                    filter.push_str(&format!("&{key}={}", query_escape(&v)));
                }
            }
            operator_call(|| {
                // Every page of the filtered list.
                let mut sites = Vec::new();
                loop {
                    let page: tether_proto::api::SitePage = client.get(&format!(
                        "/v1/site-states?offset={}&limit={}{filter}",
                        sites.len(),
                        tether_proto::events::MAX_PAGE
                    ))?;
                    let last =
                        page.sites.is_empty() || sites.len() + page.sites.len() >= page.total;
                    sites.extend(page.sites);
                    if last {
                        break;
                    }
                }
                if json {
                    print_json(&sites);
                } else {
                    print!(
                        "{}",
                        tether_shell::operator::site_states_table(&sites, unix_now())
                    );
                }
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Events { site, json, admin } => {
            let client = admin.client()?;
            let path = format!("/v1/sites/{}/events", query_escape(&site));
            operator_call(|| {
                let events: tether_proto::api::SiteEvents = client.get(&path)?;
                if json {
                    print_json(&events);
                } else {
                    print!(
                        "{}",
                        tether_shell::operator::events_table(&events, unix_now())
                    );
                }
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Trace {
            target,
            from,
            traffic,
            json,
            admin,
        } => {
            let client = admin.client()?;
            let mut path = format!("/v1/trace/{}", query_escape(&target));
            if let Some(from) = &from {
                path.push_str(&format!(
                    "?from={}&traffic={}",
                    query_escape(from),
                    query_escape(&traffic)
                ));
            }
            operator_call(|| {
                let trace: tether_proto::api::Trace = client.get(&path)?;
                if json {
                    print_json(&trace);
                } else {
                    print!("{}", tether_shell::operator::trace_text(&trace));
                }
                Ok(if tether_shell::operator::trace_routed(&trace) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(tether_shell::operator::EXIT_NO_ROUTE)
                })
            })
        }
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => {
            let origin = file.display().to_string();
            let policy = tether_config::policy::check_file(&file)?;
            println!(
                "{origin}: ok, {} rules, {} groups, backends = {}",
                policy.rules().len(),
                policy.groups().len(),
                match policy.backends() {
                    tether_proto::policy::Backends::Region => "region",
                    tether_proto::policy::Backends::Rules => "rules",
                }
            );
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => {
            let origin = file.display().to_string();
            let config = ClientFile::load(&file)?.validate(&origin)?;
            if let Some(proxy) = &config.proxy {
                tether::proxy::Proxy::parse(proxy, &format!("{origin}: transport.proxy"))?;
            }
            // The overlay the site learned at its last connection, if any.
            let state = StateDir::new(config.state_dir.clone().unwrap_or_else(default_state_dir));
            state.check_lans(&config.lans, &origin)?;
            println!("{origin}: ok");
            ExitCode::SUCCESS
        }
    })
}

/// Percent-encodes what is not safe in a URL query value or path segment
/// (prefixes keep their '/' readable: it is legal in a query).
fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
