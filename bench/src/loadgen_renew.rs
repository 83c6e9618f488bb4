//! `tether-loadgen renew`: enrolled sites that hold their tunnels and renew
//! their certificates as the agent does, for watching a CA rotation.
//!
//! Each site opens a CONNECT-IP tunnel trusting its whole trust bundle (as
//! the agent does, so the broker presents a certificate from a CA the site
//! knows). At half its certificate's lifetime it renews the certificate
//! over that tunnel's connection, stores the new certificate and trust
//! bundle, opens a new tunnel with it and only then closes the old one
//! (make before break). It prints, one line each:
//! - `connected N in S s` once every site is up;
//! - `renewed <i> by <issuing CA> bundle <CA>+<CA> address <same|changed>`
//!   after each renewal and new tunnel;
//! - `failed <i>: <error>` when a renewal or its new tunnel fails (the old
//!   tunnel stays; tried again 1 s later);
//! - `lost <i>: <reason>` when a site's tunnel ends without the site
//!   closing it (it then dials again until it is back: `back <i>`);
//! - `reattested <i>` when a site whose certificate had expired before it
//!   could connect renewed it by re-attestation, as the agent does.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use tether::h3client::H3Client;
use tether::state_dir::StateDir;
use tether_proto::api::{RENEW_PATH, RenewRequest, RenewResponse};
use tether_proto::h3::Request;
use tether_tests::Tunnel;

/// Opens a site's tunnel, trusting its whole trust bundle.
async fn open(
    endpoint: &quinn::Endpoint,
    broker: SocketAddr,
    state: &StateDir,
) -> anyhow::Result<Tunnel> {
    let creds = state.credentials()?;
    let tls = tether_pki::tls::client_config_trusting(
        &creds.bundle,
        Some((creds.chain.clone(), creds.key.clone_key())),
        0,
    )?;
    crate::open_tunnel_with(endpoint, broker, tls, crate::agent_keepalive()).await
}

/// Renews the site's certificate over `client`'s connection and stores it
/// with the trust bundle, as the agent does.
async fn renew(client: &H3Client, broker: SocketAddr, state: &StateDir) -> anyhow::Result<()> {
    let creds = state.credentials()?;
    let (key, csr) = tether_pki::ca::site_key_and_csr(creds.identity.site.as_str())?;
    let body = serde_json::to_vec(&RenewRequest {
        csr: data_encoding::BASE64.encode(&csr),
    })?;
    let request = Request::new("POST", &broker.to_string(), RENEW_PATH)
        .with_header("content-type", "application/json");
    let answer = client.request(&request, &body).await?;
    anyhow::ensure!(
        answer.head.status == 200,
        "renewal refused: HTTP {} {}",
        answer.head.status,
        String::from_utf8_lossy(&answer.body)
    );
    let renewed: RenewResponse = serde_json::from_slice(&answer.body)?;
    tether::enroll::save_renewal(state, &key.serialize_der(), creds.identity, &renewed)
}

/// When the site's certificate is at half its lifetime.
fn half_life(state: &StateDir) -> anyhow::Result<SystemTime> {
    let id = state.credentials()?.identity;
    Ok(tether_pki::token::from_unix_secs(
        id.issued_at + id.not_after.saturating_sub(id.issued_at) / 2,
    ))
}

/// The issuing CA of the site's certificate and the CAs of its bundle.
fn trust_of(state: &StateDir) -> (String, String) {
    let Ok(creds) = state.credentials() else {
        return ("?".into(), "?".into());
    };
    let names = |der: &[u8]| tether_pki::ca::common_names(der).unwrap_or_default();
    let bundle: Vec<String> = creds.bundle.iter().map(|c| names(c).0).collect();
    (names(&creds.chain[0]).1, bundle.join("+"))
}

/// Renews an expired certificate by re-attestation, as the agent does.
async fn reattest(state: &StateDir) -> anyhow::Result<()> {
    let path = state.config_path();
    let config =
        tether_config::client::ClientFile::load(&path)?.validate(&path.display().to_string())?;
    let dialer = tether::link::Dialer::for_reattestation(&config, state, None)?;
    let (conn, target) = dialer
        .connect(&config, &[tether_proto::tunnel::Transport::H3])
        .await
        .map_err(|f| anyhow::anyhow!("{f}"))?;
    tether::enroll::reattest(&conn, state, &target, true).await?;
    conn.close("done");
    Ok(())
}

/// Whether the site's certificate has expired.
fn expired(state: &StateDir) -> bool {
    state
        .credentials()
        .is_ok_and(|c| tether_pki::token::from_unix_secs(c.identity.not_after) <= SystemTime::now())
}

/// Dials until the site's tunnel is up, with the agent's backoff.
async fn dial(
    i: usize,
    endpoint: &quinn::Endpoint,
    broker: SocketAddr,
    state: &StateDir,
) -> Tunnel {
    let mut step = Duration::from_millis(250);
    loop {
        if expired(state) {
            match reattest(state).await {
                Ok(()) => println!("reattested {i}"),
                Err(e) => println!("failed {i}: re-attestation: {e:#}"),
            }
        }
        match open(endpoint, broker, state).await {
            Ok(t) => return t,
            Err(_) => {
                tokio::time::sleep(step).await;
                step = (step * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// One site, until the process ends. `up` is told once its first tunnel
/// is open.
async fn site(
    i: usize,
    endpoint: quinn::Endpoint,
    broker: SocketAddr,
    state: StateDir,
    up: tokio::sync::mpsc::UnboundedSender<()>,
) {
    let mut tunnel = dial(i, &endpoint, broker, &state).await;
    let address = tether_tests::v4(&tunnel);
    let _ = up.send(());
    loop {
        let at = half_life(&state).unwrap_or_else(|_| SystemTime::now() + Duration::from_secs(1));
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            why = tunnel.client.conn.closed() => {
                println!("lost {i}: {why}");
                tunnel = dial(i, &endpoint, broker, &state).await;
                println!("back {i}");
                continue;
            }
            () = tokio::time::sleep(wait) => {}
        }
        let renewed = match renew(&tunnel.client, broker, &state).await {
            Ok(()) => open(&endpoint, broker, &state).await,
            Err(e) => Err(e),
        };
        match renewed {
            Ok(new) => {
                let old = std::mem::replace(&mut tunnel, new);
                old.client.conn.close(0u32.into(), b"renewed");
                let (issuer, bundle) = trust_of(&state);
                let same = if tether_tests::v4(&tunnel) == address {
                    "same"
                } else {
                    "changed"
                };
                println!("renewed {i} by {issuer} bundle {bundle} address {same}");
            }
            Err(e) => {
                println!("failed {i}: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The `renew` command: `count` sites of `dir` for `hold` seconds.
pub async fn run(count: usize, broker: SocketAddr, dir: &Path, hold: u64) -> anyhow::Result<()> {
    let endpoint = tether::dial::client_endpoint(&broker)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let mut sites = tokio::task::JoinSet::new();
    for i in 0..count {
        let state = StateDir::new(dir.join(format!("site-{i}")));
        sites.spawn(site(i, endpoint.clone(), broker, state, tx.clone()));
    }
    for _ in 0..count {
        rx.recv().await;
    }
    println!(
        "connected {count} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(hold)).await;
    sites.abort_all();
    Ok(())
}
