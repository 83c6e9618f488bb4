//! `tether-loadgen`: many sites against one broker, built on the client
//! library.
//!
//! `tether-loadgen enroll --count N --admin URL --admin-token T --broker A --dir D`
//! creates N tokens and enrolls N sites into `D/site-<i>`;
//! `tether-loadgen connect --count N --broker A --dir D --hold S` opens a
//! CONNECT-IP tunnel for each (one QUIC endpoint), prints `connected N`
//! when all are up, and holds them idle for S seconds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tether::h3client::{H3Client, quic_config};
use tether::state_dir::StateDir;
use tether_proto::api::{TokenRequest, TokenResponse};
use tether_shell::operator::AdminClient;
use tether_shell::quic::transport_config;
use tether_tests::Tunnel;
use tokio::sync::Semaphore;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create tokens and enroll sites.
    Enroll {
        #[arg(long)]
        count: usize,
        #[arg(long)]
        admin: String,
        #[arg(long)]
        admin_token: String,
        #[arg(long)]
        broker: String,
        #[arg(long)]
        region: String,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Connect enrolled sites and hold their tunnels.
    Connect {
        #[arg(long)]
        count: usize,
        #[arg(long)]
        broker: SocketAddr,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 60)]
        hold: u64,
    },
}

fn site_dir(dir: &std::path::Path, i: usize) -> StateDir {
    StateDir::new(dir.join(format!("site-{i}")))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Enroll {
            count,
            admin,
            admin_token,
            broker,
            region,
            dir,
        } => {
            let started = Instant::now();
            let codes = tokio::task::spawn_blocking(move || {
                let client = AdminClient::new(&admin, &admin_token);
                (0..count)
                    .map(|i| {
                        let t: TokenResponse = client
                            .post(
                                "/v1/tokens",
                                &TokenRequest {
                                    site: format!("load-{i}").parse().unwrap(),
                                    region: region.parse().unwrap(),
                                    ttl: None,
                                },
                            )
                            .unwrap();
                        t.code
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
            let limit = Arc::new(Semaphore::new(32));
            let mut tasks = Vec::new();
            for (i, code) in codes.into_iter().enumerate() {
                let (limit, broker, state) = (limit.clone(), broker.clone(), site_dir(&dir, i));
                tasks.push(tokio::spawn(async move {
                    let _permit = limit.acquire().await.unwrap();
                    tether::enroll::enroll(&broker, &code, &state, true, None)
                        .await
                        .unwrap();
                }));
            }
            for t in tasks {
                t.await?;
            }
            println!(
                "enrolled {count} in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        Command::Connect {
            count,
            broker,
            dir,
            hold,
        } => {
            let endpoint = tether::dial::client_endpoint(&broker)?;
            let limit = Arc::new(Semaphore::new(64));
            let mut tasks = Vec::new();
            let started = Instant::now();
            for i in 0..count {
                let (limit, endpoint, state) = (limit.clone(), endpoint.clone(), site_dir(&dir, i));
                tasks.push(tokio::spawn(async move {
                    let _permit = limit.acquire().await.unwrap();
                    let creds = state.credentials().unwrap();
                    let tls = client_tls(&creds);
                    let config = quic_config(
                        tls,
                        transport_config(Duration::from_secs(5), Duration::from_secs(12)),
                    )
                    .unwrap();
                    let mut client =
                        H3Client::connect(&endpoint, config, broker, &broker.ip().to_string())
                            .await
                            .unwrap();
                    client.peer_settings(Duration::from_secs(10)).await.unwrap();
                    let mut tunnel = Tunnel::open(client)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e:?}"))
                        .unwrap();
                    tunnel.configured().await;
                    tunnel
                }));
            }
            let mut tunnels = Vec::new();
            for t in tasks {
                tunnels.push(t.await?);
            }
            println!(
                "connected {} in {:.1} s",
                tunnels.len(),
                started.elapsed().as_secs_f64()
            );
            tokio::time::sleep(Duration::from_secs(hold)).await;
            drop(tunnels);
        }
    }
    Ok(())
}

fn client_tls(creds: &tether::state_dir::Credentials) -> quinn::rustls::ClientConfig {
    tether_pki::tls::client_config(
        &creds.ca,
        Some((creds.chain.clone(), creds.key.clone_key())),
    )
    .unwrap()
}
