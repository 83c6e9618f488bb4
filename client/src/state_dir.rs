//! The site's state directory: its key (mode 0600), certificate, the CA,
//! and the configuration `tether enroll` writes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use tether_pki::ca::{create_private_dir, der_to_pem, pem_to_der, replace_file};
use tether_proto::ids::{RegionId, SiteId};

/// The site's private key.
pub const KEY_FILE: &str = "site.key";
/// The site's certificate.
pub const CERT_FILE: &str = "site.crt";
/// The tether CA that signed the site's certificate.
pub const CA_FILE: &str = "ca.crt";
/// The trust bundle: every CA the deployment trusts (two during a CA
/// rotation), as the broker last sent it. The broker is verified against
/// it; without it, against `ca.crt` alone.
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";
/// The configuration written at enrollment.
pub const CONFIG_FILE: &str = "tether.toml";
/// Who this site is.
pub const IDENTITY_FILE: &str = "identity.json";

/// File recording the transport that last worked.
pub const TRANSPORT_FILE: &str = "transport";

/// File recording the prefixes the broker last routed through the tunnel
/// (one a line), so a LAN overlapping them is refused before connecting.
pub const TUNNEL_ROUTES_FILE: &str = "tunnel-routes";

/// Most CA certificates a trust bundle may hold (two during a rotation;
/// the rest is room, and a limit on what a broker can make a site store).
pub const MAX_BUNDLE_CERTS: usize = 8;

/// `/var/lib/tether` for root, else `~/.local/state/tether`.
pub fn default_state_dir() -> PathBuf {
    tether_config::default_state_dir("tether")
}

/// What `identity.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The SPIFFE identity.
    pub identity: String,
    /// The site.
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// Certificate expiry, Unix seconds.
    pub not_after: u64,
    /// When the certificate was obtained, Unix seconds.
    pub issued_at: u64,
}

/// A site's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// Its path.
    pub path: PathBuf,
}

/// What a site needs to connect.
pub struct Credentials {
    /// Its certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its key.
    pub key: PrivateKeyDer<'static>,
    /// The CA.
    pub ca: CertificateDer<'static>,
    /// The trust bundle the broker is verified against (at least `ca`).
    pub bundle: Vec<CertificateDer<'static>>,
    /// Who it is.
    pub identity: Identity,
}

impl StateDir {
    /// The state directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Whether the site has enrolled.
    pub fn is_enrolled(&self) -> bool {
        self.file(CERT_FILE).exists() && self.file(KEY_FILE).exists()
    }

    /// The configuration file's path.
    pub fn config_path(&self) -> PathBuf {
        self.file(CONFIG_FILE)
    }

    /// Stores a new key and certificate (and the CA and identity), each file
    /// replaced atomically; the key first, so a crash never pairs a new
    /// certificate with an old key.
    pub fn save(
        &self,
        key_pkcs8: &[u8],
        cert_pem: &str,
        ca_pem: &str,
        identity: &Identity,
    ) -> anyhow::Result<()> {
        create_private_dir(&self.path)?;
        replace_file(
            &self.file(KEY_FILE),
            der_to_pem(key_pkcs8, "PRIVATE KEY").as_bytes(),
            0o600,
        )?;
        replace_file(&self.file(CERT_FILE), cert_pem.as_bytes(), 0o644)?;
        replace_file(&self.file(CA_FILE), ca_pem.as_bytes(), 0o644)?;
        replace_file(
            &self.file(IDENTITY_FILE),
            serde_json::to_string_pretty(identity)?.as_bytes(),
            0o644,
        )?;
        Ok(())
    }

    /// Stores the trust bundle the broker sent (PEM, one or more CA
    /// certificates). A bundle that does not parse is refused and the
    /// previous one kept.
    pub fn save_trust_bundle(&self, bundle_pem: &str) -> anyhow::Result<()> {
        let certs = tether_pki::ca::pems_to_der(bundle_pem, "CERTIFICATE")
            .filter(|c| !c.is_empty())
            .context("the broker sent a damaged or empty trust bundle; keeping the previous one")?;
        if certs.len() > MAX_BUNDLE_CERTS {
            anyhow::bail!(
                "the broker sent a trust bundle of {} certificates (at most {MAX_BUNDLE_CERTS}); keeping the previous one",
                certs.len()
            );
        }
        let mut text = String::new();
        for der in &certs {
            text.push_str(&der_to_pem(der, "CERTIFICATE"));
        }
        create_private_dir(&self.path)?;
        if std::fs::read_to_string(self.file(TRUST_BUNDLE_FILE))
            .ok()
            .as_deref()
            != Some(&text)
        {
            replace_file(&self.file(TRUST_BUNDLE_FILE), text.as_bytes(), 0o644)?;
            tracing::info!(certificates = certs.len(), "trust bundle updated");
        }
        Ok(())
    }

    /// The stored trust bundle, if any.
    pub fn trust_bundle(&self) -> anyhow::Result<Option<Vec<CertificateDer<'static>>>> {
        let path = self.file(TRUST_BUNDLE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let certs = tether_pki::ca::pems_to_der(&text, "CERTIFICATE")
            .filter(|c| !c.is_empty())
            .with_context(|| {
                format!(
                    "{} is damaged; delete it to fall back to ca.crt",
                    path.display()
                )
            })?;
        Ok(Some(certs.into_iter().map(CertificateDer::from).collect()))
    }

    /// The transport that last worked, if recorded.
    pub fn last_transport(&self) -> Option<tether_proto::tunnel::Transport> {
        std::fs::read_to_string(self.file(TRANSPORT_FILE))
            .ok()
            .and_then(|t| tether_proto::tunnel::Transport::parse(&t))
    }

    /// Records the transport that worked (best effort: a read-only state
    /// directory only costs the next start a slower climb).
    pub fn save_transport(&self, transport: tether_proto::tunnel::Transport) {
        if self.last_transport() != Some(transport)
            && let Err(e) = replace_file(
                &self.file(TRANSPORT_FILE),
                format!("{transport}\n").as_bytes(),
                0o644,
            )
        {
            tracing::debug!(error = %e, "could not record the transport");
        }
    }

    /// The prefixes the broker last routed through the tunnel, as
    /// recorded; none if never recorded (lines that do not parse are
    /// skipped: the file is only a hint for checking the LANs).
    pub fn tunnel_routes(&self) -> Vec<ipnet::IpNet> {
        std::fs::read_to_string(self.file(TUNNEL_ROUTES_FILE))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Records the prefixes the broker routes through the tunnel (best
    /// effort, like the transport).
    pub fn save_tunnel_routes(&self, routes: &[ipnet::IpNet]) {
        if self.tunnel_routes() != routes {
            let text: String = routes.iter().map(|r| format!("{r}\n")).collect();
            if let Err(e) = replace_file(&self.file(TUNNEL_ROUTES_FILE), text.as_bytes(), 0o644) {
                tracing::debug!(error = %e, "could not record the tunnel's routes");
            }
        }
    }

    /// Refuses `lans` overlapping the prefixes the broker last routed
    /// through the tunnel, as recorded here.
    pub fn check_lans(&self, lans: &[ipnet::IpNet], origin: &str) -> anyhow::Result<()> {
        let routes = self.tunnel_routes();
        tether_config::client::check_lans_against_tunnel(lans, &routes, origin).with_context(|| {
            format!(
                "the LANs conflict with the overlay this site last learned (recorded in {})",
                self.file(TUNNEL_ROUTES_FILE).display()
            )
        })
    }

    /// Writes the configuration file.
    pub fn save_config(&self, text: &str) -> anyhow::Result<()> {
        create_private_dir(&self.path)?;
        replace_file(&self.config_path(), text.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Loads what the site needs to connect.
    pub fn credentials(&self) -> anyhow::Result<Credentials> {
        if !self.is_enrolled() {
            anyhow::bail!(
                "this site is not enrolled (nothing in {}): run `tether enroll --broker <broker> --token <code>` first",
                self.path.display()
            );
        }
        let read = |name: &str| {
            let path = self.file(name);
            std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))
        };
        let pem = |name: &str, label: &str| -> anyhow::Result<Vec<u8>> {
            pem_to_der(&read(name)?, label)
                .with_context(|| format!("{} holds no {label}", self.file(name).display()))
        };
        let identity: Identity = serde_json::from_str(&read(IDENTITY_FILE)?)
            .context("identity.json is damaged; enroll again")?;
        let ca = CertificateDer::from(pem(CA_FILE, "CERTIFICATE")?);
        let mut bundle = self.trust_bundle()?.unwrap_or_default();
        if !bundle.contains(&ca) {
            bundle.push(ca.clone());
        }
        Ok(Credentials {
            chain: vec![CertificateDer::from(pem(CERT_FILE, "CERTIFICATE")?)],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pem(KEY_FILE, "PRIVATE KEY")?)),
            ca,
            bundle,
            identity,
        })
    }
}

/// Whether `path` is readable by others (a key must not be).
pub fn mode_of(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}
