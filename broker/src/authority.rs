//! The deployment's certificate authority as a broker uses it: which CA
//! signs, which CAs are trusted (the trust bundle), and CA rotation.
//!
//! The CA state ([`CaState`]: certificates, keys, rotation phase) lives in
//! the store, so brokers sharing a store share it. The CA private keys in
//! it are sealed under the key-encryption key (KEK) of `[ca]
//! key_encryption_key_file` ([`tether_pki::kek`]); keys an earlier version
//! stored in clear are sealed at start. On first start a CA in the data
//! directory (`ca.crt`, `ca.key` from `tether-broker pki init`) is imported
//! into the store, or a new one is made in memory; from then on the
//! store's copy is the one in use. Every
//! change (a rotation step on this broker or another) reaches
//! [`Authority::reload`], which swaps the trusted CAs of the TLS listeners
//! and reissues the broker's server certificates, one per trusted CA,
//! without touching established connections. [`Authority::trust`] is what
//! the broker's `/metrics` reports of it. With them it issues the broker's
//! link certificate ([`Authority::link_signer`]), which vouches for the
//! broker-to-broker link key in the fleet record
//! ([`tether_pki::link`]); [`Authority::link_signer_changes`] tells when
//! it was reissued, so the record is written again then.
//!
//! The phases and their rules are [`tether_pki::rotation`]'s.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use tether_config::broker::{BrokerConfig, DEFAULT_KEK_FILE};
use tether_pki::ca::{CA_CERT_FILE, CA_KEY_FILE, DEFAULT_SERVER_CERT_LIFETIME};
use tether_pki::kek::{Kek, KekError, StoredKey};
use tether_pki::link::LinkSigner;
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
    /// The KEK is wrong, unreadable, or a sealed key does not open.
    #[error(transparent)]
    Kek(#[from] KekError),
    /// The store holds sealed keys, but the KEK file is missing.
    #[error(
        "the CA key in the store is encrypted, but the key-encryption key file {} does not exist: \
         put the deployment's key-encryption key there (every broker and every restore needs the same one), \
         or name it in [ca] key_encryption_key_file",
        .0.display()
    )]
    NoKek(PathBuf),
    /// A configured KEK file is missing for a new CA.
    #[error(
        "the key-encryption key file {} does not exist: make it with `tether-broker ca new-kek --out {}` \
         (once per deployment; every broker needs the same one)",
        .0.display(), .0.display()
    )]
    NoKekYet(PathBuf),
}

/// The CA state as loaded: parsed CAs ready to sign.
struct Loaded {
    raw: String,
    state: CaState,
    /// The trust bundle, the signing CA first.
    bundle: Vec<Arc<Ca>>,
    /// When the earliest of the broker's server certificates (and its
    /// link certificate) expires.
    server_not_after: SystemTime,
    /// The link certificate, from the signing CA.
    link: Arc<LinkSigner>,
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
    kek: RwLock<Kek>,
    /// Bumped whenever the link certificate is reissued.
    link_reissued: tokio::sync::watch::Sender<u64>,
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

/// `ca` as the store keeps it: its key sealed under `kek`.
fn sealed_pem(ca: &Ca, kek: &Kek) -> Result<CaPem, AuthorityError> {
    let cert = ca.cert_pem().to_string();
    let key = StoredKey::Sealed(kek.seal(&cert, &ca.key_pem())?);
    Ok(CaPem { cert, key })
}

/// The KEK file of a configuration: `[ca] key_encryption_key_file`, else
/// [`DEFAULT_KEK_FILE`] in the data directory.
pub fn kek_path(config: &BrokerConfig, data_dir: &Path) -> PathBuf {
    config
        .ca_kek_file
        .clone()
        .unwrap_or_else(|| data_dir.join(DEFAULT_KEK_FILE))
}

/// Loads the KEK. The default file (embedded store, no `[ca]` setting) is
/// created when the store holds no sealed key yet; a configured file is
/// never created, since every broker needs the same one.
fn load_kek(
    config: &BrokerConfig,
    data_dir: &Path,
    stored: Option<&CaState>,
) -> Result<Kek, AuthorityError> {
    let path = kek_path(config, data_dir);
    let any_sealed = stored
        .is_some_and(|s| s.current.is_sealed() || s.next.as_ref().is_some_and(CaPem::is_sealed));
    match Kek::load(&path) {
        Ok(kek) => Ok(kek),
        Err(KekError::Missing(_)) if any_sealed => Err(AuthorityError::NoKek(path)),
        Err(KekError::Missing(_)) if config.ca_kek_file.is_some() => {
            Err(AuthorityError::NoKekYet(path))
        }
        Err(KekError::Missing(_)) => {
            let kek = Kek::generate(&path)?;
            kek.write_new()?;
            tracing::info!(
                file = %path.display(),
                kek = %kek.id(),
                "created the key-encryption key of the CA keys; keep a copy apart from the backups"
            );
            Ok(kek)
        }
        Err(e) => Err(e.into()),
    }
}

/// Seals every key of the stored state that is in clear (records of
/// earlier versions), by compare-and-swap. Returns the state as stored.
fn seal_clear_keys(store: &dyn Store, kek: &Kek, raw: String) -> Result<String, AuthorityError> {
    let mut raw = raw;
    for _ in 0..SWAP_ATTEMPTS {
        let mut state = parse(&raw)?;
        if state.is_sealed() {
            return Ok(raw);
        }
        for ca in state.cas_mut() {
            if let StoredKey::Clear(pem) = &ca.key {
                ca.key = StoredKey::Sealed(kek.seal(&ca.cert, pem)?);
            }
        }
        let sealed = encode(&state)?;
        if store.swap_ca_state(Some(&raw), &sealed)? {
            tracing::info!(
                file = %kek.origin().display(),
                kek = %kek.id(),
                "the CA keys in the store were in clear; they are now encrypted with the key-encryption key"
            );
            return Ok(sealed);
        }
        raw = store
            .ca_state()?
            .ok_or_else(|| AuthorityError::Damaged("vanished".into()))?;
    }
    Err(AuthorityError::Contention)
}

/// Seals every CA key in the store under `new`, opening them with `old`
/// (keys already sealed under `new` are left as they are). Returns how many
/// keys the state holds. For `tether-broker ca rekey`.
pub fn rekey(store: &dyn Store, old: &Kek, new: &Kek) -> Result<usize, AuthorityError> {
    for _ in 0..SWAP_ATTEMPTS {
        let raw = store
            .ca_state()?
            .ok_or_else(|| AuthorityError::Damaged("no CA state in the store".into()))?;
        let mut state = parse(&raw)?;
        let mut count = 0;
        for ca in state.cas_mut() {
            count += 1;
            if ca.key.kek_id() == Some(new.id().as_str()) {
                continue;
            }
            let pem = old.reveal(&ca.cert, &ca.key)?;
            ca.key = StoredKey::Sealed(new.seal(&ca.cert, &pem)?);
        }
        if store.swap_ca_state(Some(&raw), &encode(&state)?)? {
            return Ok(count);
        }
    }
    Err(AuthorityError::Contention)
}

/// The CA of the data directory (`tether-broker pki init`, or a broker
/// of an earlier version) to import, or a new one made in memory (no key
/// is written to disk in clear). Returns whether it was made.
fn first_ca(config: &BrokerConfig, data_dir: &Path) -> Result<(Ca, bool), AuthorityError> {
    if data_dir.join(CA_CERT_FILE).exists() || data_dir.join(CA_KEY_FILE).exists() {
        Ok(Ca::load_or_init(
            data_dir,
            config.trust_domain.clone(),
            SystemTime::now(),
        )?)
    } else {
        Ok((
            Ca::generate(config.trust_domain.clone(), SystemTime::now())?,
            true,
        ))
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
        let stored = store.ca_state()?;
        let parsed = stored.as_deref().map(parse).transpose()?;
        let kek = load_kek(config, data_dir, parsed.as_ref())?;
        let raw = match stored {
            Some(raw) => seal_clear_keys(&*store, &kek, raw)?,
            None => {
                let (ca, made) = first_ca(config, data_dir)?;
                created = made;
                let raw = encode(&CaState::new(sealed_pem(&ca, &kek)?, now_unix()))?;
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
        if data_dir.join(CA_KEY_FILE).exists() {
            tracing::warn!(
                file = %data_dir.join(CA_KEY_FILE).display(),
                "this file holds a CA key in clear; the broker uses the encrypted copy in the store: delete the file once a backup and the key-encryption key are kept safe"
            );
        }
        let state = parse(&raw)?;
        let bundle = Self::cas(&state, &kek)?;
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
        let link = Self::link_cert(&bundle, &server_names, &server_ips)?;
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
                link,
            })),
            kek: RwLock::new(kek),
            link_reissued: tokio::sync::watch::Sender::new(0),
        };
        authority.install(raw, state, bundle)?;
        Ok((authority, created))
    }

    fn cas(state: &CaState, kek: &Kek) -> Result<Vec<Arc<Ca>>, AuthorityError> {
        state
            .bundle()
            .into_iter()
            .map(|pem| {
                let key = kek.reveal(&pem.cert, &pem.key)?;
                Ok(Arc::new(Ca::from_pem(&pem.cert, &key)?))
            })
            .collect()
    }

    fn kek(&self) -> Kek {
        match self.kek.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The CAs of `state`, opened with the KEK; if the state was sealed
    /// under another KEK (`ca rekey`), reads the KEK file again, so a
    /// broker whose file was replaced follows without a restart.
    fn open_cas(&self, state: &CaState) -> Result<Vec<Arc<Ca>>, AuthorityError> {
        let kek = self.kek();
        match Self::cas(state, &kek) {
            Err(AuthorityError::Kek(KekError::WrongKek { .. })) => {
                let again = Kek::load(kek.origin())?;
                if again.id() == kek.id() {
                    return Self::cas(state, &kek);
                }
                let bundle = Self::cas(state, &again)?;
                tracing::info!(file = %again.origin().display(), kek = %again.id(), "using the replaced key-encryption key");
                if let Ok(mut k) = self.kek.write() {
                    *k = again;
                }
                Ok(bundle)
            }
            other => other,
        }
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

    /// The link certificate, from the signing CA (the first of `bundle`):
    /// a broker certificate with a key of its own, which signs nothing but
    /// the link's proof ([`tether_pki::link`]).
    fn link_cert(
        bundle: &[Arc<Ca>],
        names: &[String],
        ips: &[IpAddr],
    ) -> Result<Arc<LinkSigner>, AuthorityError> {
        let signer = bundle
            .first()
            .ok_or_else(|| AuthorityError::Damaged("no CA".into()))?;
        let (cert, key) =
            signer.issue_server(names, ips, SystemTime::now(), DEFAULT_SERVER_CERT_LIFETIME)?;
        Ok(Arc::new(LinkSigner::new(cert.der, &key)?))
    }

    /// Makes `state` the one in use: trusted CAs, server certificates,
    /// link certificate, metrics.
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
        let link = Self::link_cert(&bundle, &self.server_names, &self.server_ips)?;
        let server_not_after = server_not_after.min(link.not_after());
        // Trust first, then present: a site renewed into a new CA is
        // accepted before any broker certificate from it is shown.
        self.anchors.replace(&ders)?;
        self.slot.replace_all(certs)?;
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
                link,
            });
        }
        self.link_reissued.send_modify(|n| *n += 1);
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
        let bundle = self.open_cas(&state)?;
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
                let bundle = self.open_cas(&next)?;
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
        // Follows a re-sealing (`ca rekey`) first, so the new CA is sealed
        // under the KEK the state is in.
        self.reload()?;
        let kek = self.kek();
        self.change(move |state, now| {
            let next = if state.phase == Phase::Stable {
                Some(sealed_pem(
                    &Ca::generate(trust_domain.clone(), SystemTime::now())?,
                    &kek,
                )?)
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

    /// The CA state and certificate expiries, for the metrics.
    pub fn trust(&self) -> crate::metrics::Trust {
        let loaded = self.loaded();
        crate::metrics::Trust {
            phase: loaded.state.phase,
            bundle: loaded
                .bundle
                .iter()
                .enumerate()
                .map(|(i, ca)| crate::metrics::CaExpiry {
                    name: ca.name(),
                    signing: i == 0,
                    not_after: ca.not_after(),
                })
                .collect(),
            server_not_after: loaded.server_not_after,
        }
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

    /// The broker's link certificate, from the signing CA: it proves the
    /// broker-to-broker link key in the fleet record.
    pub fn link_signer(&self) -> Arc<LinkSigner> {
        self.loaded().link.clone()
    }

    /// Changes whenever the link certificate is reissued (a CA change, or
    /// renewal well before its end).
    pub fn link_signer_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.link_reissued.subscribe()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn config(data: &Path, kek: Option<&Path>) -> BrokerConfig {
        let mut text = format!("data_dir = {data:?}\n");
        if let Some(kek) = kek {
            text.push_str(&format!("[ca]\nkey_encryption_key_file = {kek:?}\n"));
        }
        tether_config::broker::BrokerFile::parse(&text, "t")
            .unwrap()
            .validate("t")
            .unwrap()
    }

    fn store(data: &Path) -> Arc<dyn Store> {
        Arc::new(RedbStore::open(&data.join(crate::store::EMBEDDED_FILE)).unwrap())
    }

    fn open(data: &Path, kek: Option<&Path>) -> Result<Authority, AuthorityError> {
        Authority::open(&config(data, kek), data, store(data)).map(|(a, _)| a)
    }

    #[test]
    fn the_ca_key_is_stored_only_sealed_and_opens_only_with_its_kek() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        tether_pki::ca::create_private_dir(&data).unwrap();
        let first = open(&data, None).unwrap();
        let pin = first.status().bundle[0].pin.clone();
        drop(first);
        // A new deployment: a KEK file 0600 in the data directory, no key
        // in clear anywhere.
        use std::os::unix::fs::PermissionsExt;
        let kek_file = data.join(DEFAULT_KEK_FILE);
        let mode = std::fs::metadata(&kek_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!data.join(CA_KEY_FILE).exists());
        let raw = store(&data).ca_state().unwrap().unwrap();
        assert!(!raw.contains("PRIVATE KEY"), "{raw}");
        assert!(raw.contains(tether_pki::kek::SEALED_FORMAT), "{raw}");

        // The same KEK opens it again.
        assert_eq!(open(&data, None).unwrap().status().bundle[0].pin, pin);

        // A wrong KEK and a missing one are refused in plain words; no new
        // KEK is made over a sealed store.
        std::fs::rename(&kek_file, dir.path().join("saved")).unwrap();
        let missing = open(&data, None).unwrap_err().to_string();
        assert!(
            missing.contains("is encrypted, but the key-encryption key file"),
            "{missing}"
        );
        assert!(!kek_file.exists());
        let other = dir.path().join("other");
        Kek::generate(&other).unwrap().write_new().unwrap();
        let wrong = open(&data, Some(&other)).unwrap_err().to_string();
        assert!(
            wrong.starts_with(&format!(
                "the CA key cannot be decrypted with {}: wrong key-encryption key?",
                other.display()
            )),
            "{wrong}"
        );

        // Rekey: the keys move to the other KEK; the CA stays the same.
        let saved = Kek::load(&dir.path().join("saved")).unwrap();
        let new = Kek::load(&other).unwrap();
        assert_eq!(rekey(&*store(&data), &saved, &new).unwrap(), 1);
        assert_eq!(
            rekey(&*store(&data), &saved, &new).unwrap(),
            1,
            "idempotent"
        );
        assert_eq!(
            open(&data, Some(&other)).unwrap().status().bundle[0].pin,
            pin
        );
        std::fs::rename(dir.path().join("saved"), &kek_file).unwrap();
        assert!(
            open(&data, None)
                .unwrap_err()
                .to_string()
                .contains("wrong key-encryption key?")
        );
    }

    #[test]
    fn a_clear_ca_key_of_an_earlier_version_is_read_and_rewritten_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        tether_pki::ca::create_private_dir(&data).unwrap();
        let ca = Ca::generate(
            TrustDomain::new("tether.internal").unwrap(),
            SystemTime::now(),
        )
        .unwrap();
        let clear = CaState::new(
            CaPem {
                cert: ca.cert_pem().to_string(),
                key: StoredKey::Clear(ca.key_pem()),
            },
            1,
        );
        let text = encode(&clear).unwrap();
        assert!(text.contains("PRIVATE KEY"));
        assert!(store(&data).swap_ca_state(None, &text).unwrap());

        let authority = open(&data, None).unwrap();
        assert_eq!(authority.cert_der(), *ca.cert_der(), "the same CA");
        drop(authority);
        let raw = store(&data).ca_state().unwrap().unwrap();
        assert!(!raw.contains("PRIVATE KEY"), "{raw}");
        let state = parse(&raw).unwrap();
        assert!(state.is_sealed());
        assert_eq!(state.generation, clear.generation);
        let kek = Kek::load(&data.join(DEFAULT_KEK_FILE)).unwrap();
        assert_eq!(
            kek.reveal(&state.current.cert, &state.current.key).unwrap(),
            ca.key_pem()
        );
    }

    #[test]
    fn a_rotated_in_ca_is_sealed_too() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        tether_pki::ca::create_private_dir(&data).unwrap();
        let authority = open(&data, None).unwrap();
        authority.rotate().unwrap();
        drop(authority);
        let state = parse(&store(&data).ca_state().unwrap().unwrap()).unwrap();
        assert_eq!(state.phase, Phase::Prepared);
        assert!(state.next.as_ref().is_some_and(CaPem::is_sealed));
    }
}
