//! The deployment's certificate authority as a broker uses it: which CA
//! signs, which CAs are trusted (the trust bundle), and CA rotation.
//!
//! The CA state ([`CaState`]: certificates, keys, rotation phase) lives in
//! the store, so brokers sharing a store share it. On first start the CA of
//! the data directory (`ca.crt`, `ca.key`, created if missing) is imported
//! into the store; from then on the store's copy is the one in use. Every
//! change (a rotation step on this broker or another) reaches
//! [`Authority::reload`], which swaps the trusted CAs of the TLS listeners
//! and reissues the broker's server certificates, one per trusted CA,
//! without touching established connections.
//!
//! The phases and their rules are [`tether_pki::rotation`]'s.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use tether_config::broker::BrokerConfig;
use tether_pki::ca::DEFAULT_SERVER_CERT_LIFETIME;
use tether_pki::rotation::{CaPem, CaState, Phase, RotationError};
use tether_pki::tls::ServerCert;
use tether_pki::{Ca, CertSlot, IssuedCert, PkiError, SiteIdentity, TrustAnchors, TrustDomain};
use tether_proto::api::{CaInfo, CaStatus};
use thiserror::Error;

use crate::store::{Store, StoreError, now_unix};

/// Why a CA operation failed.
#[derive(Debug, Error)]
pub enum AuthorityError {
    /// The rotation step is not allowed now (the words say why).
    #[error(transparent)]
    Rotation(#[from] RotationError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A CA or certificate could not be made or read.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// TLS rejected a certificate or the bundle.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The stored state is not usable.
    #[error("the stored CA state is damaged: {0}")]
    Damaged(String),
    /// Another broker kept changing the state.
    #[error("another broker changed the CA state at the same time; try again")]
    Contention,
}

/// The CA state as loaded: parsed CAs ready to sign.
struct Loaded {
    raw: String,
    state: CaState,
    /// The trust bundle, the signing CA first.
    bundle: Vec<Arc<Ca>>,
    /// When the earliest of the broker's server certificates expires.
    server_not_after: SystemTime,
}

/// The broker's view of the deployment's CA (see the module documentation).
pub struct Authority {
    trust_domain: TrustDomain,
    store: Arc<dyn Store>,
    leaf_lifetime: Duration,
    server_names: Vec<String>,
    server_ips: Vec<IpAddr>,
    slot: Arc<CertSlot>,
    anchors: Arc<TrustAnchors>,
    loaded: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// How many times a rotation step is tried against concurrent changes.
const SWAP_ATTEMPTS: usize = 4;

fn parse(raw: &str) -> Result<CaState, AuthorityError> {
    serde_json::from_str(raw).map_err(|e| AuthorityError::Damaged(e.to_string()))
}

fn encode(state: &CaState) -> Result<String, AuthorityError> {
    serde_json::to_string(state).map_err(|e| AuthorityError::Damaged(e.to_string()))
}

fn pem_of(ca: &Ca) -> CaPem {
    CaPem {
        cert: ca.cert_pem().to_string(),
        key: ca.key_pem(),
    }
}

/// The names and addresses the broker's server certificates carry.
fn server_identity(config: &BrokerConfig) -> (Vec<String>, Vec<IpAddr>) {
    let mut ips: Vec<IpAddr> = config.advertised_ips.clone();
    for addr in &config.listen {
        if !addr.ip().is_unspecified() && !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
    }
    (config.advertised_names.clone(), ips)
}

impl Authority {
    /// Loads the CA state from the store; on first start imports the data
    /// directory's CA (creating it if missing). Returns whether a CA was
    /// created.
    pub fn open(
        config: &BrokerConfig,
        data_dir: &Path,
        store: Arc<dyn Store>,
    ) -> Result<(Self, bool), AuthorityError> {
        let mut created = false;
        let raw = match store.ca_state()? {
            Some(raw) => raw,
            None => {
                let (ca, made) =
                    Ca::load_or_init(data_dir, config.trust_domain.clone(), SystemTime::now())?;
                created = made;
                let raw = encode(&CaState::new(pem_of(&ca), now_unix()))?;
                if store.swap_ca_state(None, &raw)? {
                    raw
                } else {
                    // Another broker imported its CA first: use the store's.
                    store
                        .ca_state()?
                        .ok_or_else(|| AuthorityError::Damaged("vanished".into()))?
                }
            }
        };
        let state = parse(&raw)?;
        let bundle = Self::cas(&state)?;
        if let Some(other) = bundle
            .iter()
            .find(|ca| ca.trust_domain() != &config.trust_domain)
        {
            return Err(AuthorityError::Damaged(format!(
                "the CA in the store is for trust domain {:?}, but the configuration says {:?}",
                other.trust_domain().as_str(),
                config.trust_domain.as_str()
            )));
        }
        let ders: Vec<CertificateDer<'static>> =
            bundle.iter().map(|ca| ca.cert_der().clone()).collect();
        let anchors = Arc::new(TrustAnchors::new(&ders)?);
        let (server_names, server_ips) = server_identity(config);
        let (certs, server_not_after) = Self::server_certs(&bundle, &server_names, &server_ips)?;
        let mut certs = certs.into_iter();
        let (chain, key) = certs
            .next()
            .ok_or_else(|| AuthorityError::Damaged("no CA".into()))?;
        let slot = Arc::new(CertSlot::new(chain, key)?);
        let authority = Self {
            trust_domain: config.trust_domain.clone(),
            store,
            // Brokers judge site certificates by their own clocks, which
            // may differ a little: 5 % of a lifetime beyond it.
            leaf_lifetime: config.site_cert_lifetime + config.site_cert_lifetime / 20,
            server_names,
            server_ips,
            slot,
            anchors,
            loaded: RwLock::new(Arc::new(Loaded {
                raw: String::new(),
                state: state.clone(),
                bundle: bundle.clone(),
                server_not_after,
            })),
        };
        authority.install(raw, state, bundle)?;
        Ok((authority, created))
    }

    fn cas(state: &CaState) -> Result<Vec<Arc<Ca>>, AuthorityError> {
        state
            .bundle()
            .into_iter()
            .map(|pem| Ca::from_pem(&pem.cert, &pem.key).map(Arc::new))
            .collect::<Result<_, _>>()
            .map_err(AuthorityError::from)
    }

    /// One server certificate per CA of `bundle`, in its order, and the
    /// earliest expiry.
    fn server_certs(
        bundle: &[Arc<Ca>],
        names: &[String],
        ips: &[IpAddr],
    ) -> Result<(Vec<ServerCert>, SystemTime), AuthorityError> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        let mut earliest = now + DEFAULT_SERVER_CERT_LIFETIME;
        for ca in bundle {
            let (cert, key) = ca.issue_server(names, ips, now, DEFAULT_SERVER_CERT_LIFETIME)?;
            earliest = earliest.min(cert.not_after);
            // The CA after the leaf: new sites check it against their
            // enrollment pin.
            out.push((vec![cert.der, ca.cert_der().clone()], key));
        }
        Ok((out, earliest))
    }

    /// Makes `state` the one in use: trusted CAs, server certificates,
    /// metrics.
    fn install(
        &self,
        raw: String,
        state: CaState,
        bundle: Vec<Arc<Ca>>,
    ) -> Result<(), AuthorityError> {
        let ders: Vec<CertificateDer<'static>> =
            bundle.iter().map(|ca| ca.cert_der().clone()).collect();
        let (certs, server_not_after) =
            Self::server_certs(&bundle, &self.server_names, &self.server_ips)?;
        // Trust first, then present: a site renewed into a new CA is
        // accepted before any broker certificate from it is shown.
        self.anchors.replace(&ders)?;
        self.slot.replace_all(certs)?;
        crate::metrics::ca_phase(state.phase, bundle.len());
        if let Some(signer) = bundle.first() {
            crate::metrics::ca_expiry(signer.not_after());
        }
        tracing::info!(
            phase = state.phase.as_str(),
            generation = state.generation,
            signing = %bundle.first().map(|c| c.name()).unwrap_or_default(),
            trusted = bundle.len(),
            "CA state in use"
        );
        if let Ok(mut loaded) = self.loaded.write() {
            *loaded = Arc::new(Loaded {
                raw,
                state,
                bundle,
                server_not_after,
            });
        }
        Ok(())
    }

    fn loaded(&self) -> Arc<Loaded> {
        match self.loaded.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the store's CA state and puts it in use if it changed (a
    /// rotation step here or on another broker). Returns whether it
    /// changed.
    pub fn reload(&self) -> Result<bool, AuthorityError> {
        let Some(raw) = self.store.ca_state()? else {
            return Ok(false);
        };
        if raw == self.loaded().raw {
            return Ok(false);
        }
        let state = parse(&raw)?;
        let bundle = Self::cas(&state)?;
        self.install(raw, state, bundle)?;
        Ok(true)
    }

    /// Reissues the broker's server certificates when the earliest has
    /// less than a third of its lifetime left. Returns whether it did.
    pub fn renew_server_certs(&self) -> Result<bool, AuthorityError> {
        let loaded = self.loaded();
        let left = loaded
            .server_not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        if left > DEFAULT_SERVER_CERT_LIFETIME / 3 {
            return Ok(false);
        }
        self.install(
            loaded.raw.clone(),
            loaded.state.clone(),
            loaded.bundle.clone(),
        )?;
        Ok(true)
    }

    /// Applies one rotation step to the stored state, retrying when
    /// another broker changed it meanwhile.
    fn change(
        &self,
        step: impl Fn(CaState, u64) -> Result<CaState, AuthorityError>,
    ) -> Result<CaStatus, AuthorityError> {
        for _ in 0..SWAP_ATTEMPTS {
            let raw = self
                .store
                .ca_state()?
                .ok_or_else(|| AuthorityError::Damaged("no CA state in the store".into()))?;
            let next = step(parse(&raw)?, now_unix())?;
            let encoded = encode(&next)?;
            if self.store.swap_ca_state(Some(&raw), &encoded)? {
                let bundle = Self::cas(&next)?;
                self.install(encoded, next, bundle)?;
                return Ok(self.status());
            }
        }
        Err(AuthorityError::Contention)
    }

    /// One rotation step forward: prepare a new CA, make it sign, or
    /// retire the old one.
    pub fn rotate(&self) -> Result<CaStatus, AuthorityError> {
        let trust_domain = self.trust_domain.clone();
        let lifetime = self.leaf_lifetime;
        self.change(move |state, now| {
            let next = if state.phase == Phase::Stable {
                Some(pem_of(&Ca::generate(
                    trust_domain.clone(),
                    SystemTime::now(),
                )?))
            } else {
                None
            };
            Ok(state.rotate(now, lifetime, next)?)
        })
    }

    /// One rotation step back.
    pub fn rollback(&self) -> Result<CaStatus, AuthorityError> {
        let lifetime = self.leaf_lifetime;
        self.change(move |state, now| Ok(state.rollback(now, lifetime)?))
    }

    /// The CA state, for the admin API and `ca status`.
    pub fn status(&self) -> CaStatus {
        let loaded = self.loaded();
        let state = &loaded.state;
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let next_step = match state.phase {
            Phase::Stable => "rotate: prepare a new CA and publish it in the trust bundle",
            Phase::Prepared => {
                "rotate: make the new CA sign site and broker certificates; rollback: drop the new CA"
            }
            Phase::Active => {
                "rotate: retire the old CA (once its site certificates expired); rollback: let the old CA sign again"
            }
        };
        CaStatus {
            phase: state.phase.as_str().to_string(),
            generation: state.generation,
            since: state.since,
            bundle: loaded
                .bundle
                .iter()
                .enumerate()
                .map(|(i, ca)| CaInfo {
                    name: ca.name(),
                    pin: tether_pki::tls::ca_pin(ca.cert_der()),
                    signing: i == 0,
                    not_after: unix(ca.not_after()),
                })
                .collect(),
            retire_after: state.current_leaves_until,
            drop_next_after: state.next_leaves_until,
            next_step: next_step.to_string(),
        }
    }

    /// The CA that signs now.
    pub fn signer(&self) -> Arc<Ca> {
        // `install` never stores an empty bundle (CaState::bundle has the
        // signer first).
        match self.loaded().bundle.first() {
            Some(ca) => ca.clone(),
            None => unreachable!("a CA state without a signer"),
        }
    }

    /// The deployment's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The signing CA's certificate.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.signer().cert_der().clone()
    }

    /// The signing CA's certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.signer().cert_pem().to_string()
    }

    /// When the signing CA expires.
    pub fn not_after(&self) -> SystemTime {
        self.signer().not_after()
    }

    /// The rotation phase.
    pub fn phase(&self) -> Phase {
        self.loaded().state.phase
    }

    /// The trust bundle, the signing CA first.
    pub fn bundle_der(&self) -> Vec<CertificateDer<'static>> {
        self.loaded()
            .bundle
            .iter()
            .map(|ca| ca.cert_der().clone())
            .collect()
    }

    /// The trust bundle as sites store it: PEM, the signing CA first.
    pub fn bundle_pem(&self) -> String {
        self.loaded()
            .bundle
            .iter()
            .map(|ca| ca.cert_pem().to_string())
            .collect()
    }

    /// The CAs the TLS listeners trust (follows every change).
    pub fn anchors(&self) -> Arc<TrustAnchors> {
        self.anchors.clone()
    }

    /// The broker's server certificates (follow every change).
    pub fn server_cert_slot(&self) -> Arc<CertSlot> {
        self.slot.clone()
    }

    /// Issues a site certificate from the signing CA.
    pub fn issue_site(
        &self,
        csr_der: &[u8],
        identity: &SiteIdentity,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        self.signer().issue_site(csr_der, identity, now, lifetime)
    }
}
