//! The CA's private keys encrypted at rest under a key-encryption key.
//!
//! The store (and so every backup of it, and whoever can read etcd) holds a
//! CA key only sealed: AES-256-GCM under a key-encryption key (KEK) that
//! the operator keeps elsewhere, with the CA certificate's SHA-256 as
//! associated data, so a sealed key cannot be moved under another CA's
//! certificate unnoticed. A KEK file holds 32 random bytes in base64 on
//! one line (`tether-broker ca new-kek`, or `openssl rand -base64 32`).
//!
//! A sealed key names the KEK that sealed it by a short id (a hash of the
//! KEK, not the KEK), so a wrong KEK is reported as such rather than as a
//! damaged record. Keys stored in clear by earlier versions are still read
//! ([`StoredKey::Clear`]); the broker rewrites them sealed.

use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use thiserror::Error;

/// The format tag of a sealed key (AES-256-GCM, 96-bit random nonce).
pub const SEALED_FORMAT: &str = "tether-sealed-key-v1";
/// Length of a key-encryption key, bytes.
pub const KEK_LEN: usize = 32;
/// Largest KEK file read (a base64 line and some whitespace).
const MAX_KEK_FILE: u64 = 1024;

/// Why a KEK could not be loaded or a key not be sealed or opened.
#[derive(Debug, Error)]
pub enum KekError {
    /// The KEK file does not exist.
    #[error("the key-encryption key file {} does not exist", .0.display())]
    Missing(PathBuf),
    /// The KEK file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not hold a KEK.
    #[error(
        "{} is not a key-encryption key: expected 32 random bytes in base64 on one line \
         (make one with `tether-broker ca new-kek --out FILE`)",
        .0.display()
    )]
    Malformed(PathBuf),
    /// The key was sealed under another KEK.
    #[error(
        "the CA key cannot be decrypted with {}: wrong key-encryption key? \
         (the key was encrypted with key-encryption key {sealed_with}, the file holds {file_holds}; \
         every broker of a deployment and every restore needs the same one)",
        file.display()
    )]
    WrongKek {
        /// The KEK file used.
        file: PathBuf,
        /// Id of the KEK that sealed the key.
        sealed_with: String,
        /// Id of the KEK in the file.
        file_holds: String,
    },
    /// The KEK matches but the sealed key does not open.
    #[error(
        "the CA key cannot be decrypted with {}: the stored record was altered or damaged \
         (its authentication tag does not match)",
        .0.display()
    )]
    Altered(PathBuf),
    /// A sealed key in a format this version does not know.
    #[error(
        "the CA key is sealed in format {0:?}, which this broker does not read (written by a newer version?)"
    )]
    Format(String),
    /// The system's random source failed.
    #[error("no randomness available from the operating system")]
    Random,
}

/// A key-encryption key and the file it came from (named in errors).
#[derive(Clone)]
pub struct Kek {
    key: [u8; KEK_LEN],
    origin: PathBuf,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek")
            .field("id", &self.id())
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Kek {
    /// A new random KEK (not yet written anywhere; `origin` names where
    /// it will be).
    pub fn generate(origin: &Path) -> Result<Self, KekError> {
        let mut key = [0u8; KEK_LEN];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| KekError::Random)?;
        Ok(Self {
            key,
            origin: origin.to_path_buf(),
        })
    }

    /// Reads the KEK file at `path`.
    pub fn load(path: &Path) -> Result<Self, KekError> {
        let io = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::NotFound {
                KekError::Missing(path.to_path_buf())
            } else {
                KekError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > MAX_KEK_FILE {
            return Err(KekError::Malformed(path.to_path_buf()));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        warn_if_world_readable(path);
        let bytes = data_encoding::BASE64
            .decode(text.trim().as_bytes())
            .map_err(|_| KekError::Malformed(path.to_path_buf()))?;
        let key: [u8; KEK_LEN] = bytes
            .try_into()
            .map_err(|_| KekError::Malformed(path.to_path_buf()))?;
        Ok(Self {
            key,
            origin: path.to_path_buf(),
        })
    }

    /// Writes this KEK to a new file at its origin, mode 0600 (refuses to
    /// overwrite).
    pub fn write_new(&self) -> Result<(), KekError> {
        crate::ca::write_new_file(&self.origin, self.file_text().as_bytes(), 0o600).map_err(|e| {
            KekError::Io {
                path: self.origin.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })
    }

    /// The file's content: the key in base64 and a newline.
    pub fn file_text(&self) -> String {
        format!("{}\n", data_encoding::BASE64.encode(&self.key))
    }

    /// The file this KEK came from (or goes to).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// A short public id of this KEK (16 hex digits of a hash of it; it
    /// tells keys apart and reveals nothing of the key).
    pub fn id(&self) -> String {
        let digest = sha2::Sha256::new()
            .chain_update(b"tether key-encryption key id\0")
            .chain_update(self.key)
            .finalize();
        data_encoding::HEXLOWER.encode(&digest[..8])
    }

    fn aead(&self) -> Result<LessSafeKey, KekError> {
        let unbound = UnboundKey::new(&AES_256_GCM, &self.key).map_err(|_| KekError::Random)?;
        Ok(LessSafeKey::new(unbound))
    }

    /// Seals the private key `secret` (PEM) of the CA whose certificate is
    /// `cert_pem`.
    pub fn seal(&self, cert_pem: &str, secret: &str) -> Result<SealedKey, KekError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KekError::Random)?;
        let mut data = secret.as_bytes().to_vec();
        self.aead()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data(cert_pem)),
                &mut data,
            )
            .map_err(|_| KekError::Random)?;
        Ok(SealedKey {
            format: SEALED_FORMAT.into(),
            kek: self.id(),
            nonce: data_encoding::BASE64.encode(&nonce),
            sealed: data_encoding::BASE64.encode(&data),
        })
    }

    /// Opens a key sealed by [`seal`](Self::seal) for the CA certificate
    /// `cert_pem`.
    pub fn open(&self, cert_pem: &str, sealed: &SealedKey) -> Result<String, KekError> {
        if sealed.format != SEALED_FORMAT {
            return Err(KekError::Format(sealed.format.clone()));
        }
        if sealed.kek != self.id() {
            return Err(KekError::WrongKek {
                file: self.origin.clone(),
                sealed_with: sealed.kek.clone(),
                file_holds: self.id(),
            });
        }
        let altered = || KekError::Altered(self.origin.clone());
        let nonce: [u8; NONCE_LEN] = data_encoding::BASE64
            .decode(sealed.nonce.as_bytes())
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(altered)?;
        let mut data = data_encoding::BASE64
            .decode(sealed.sealed.as_bytes())
            .map_err(|_| altered())?;
        let plain = self
            .aead()?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data(cert_pem)),
                &mut data,
            )
            .map_err(|_| altered())?;
        String::from_utf8(plain.to_vec()).map_err(|_| altered())
    }

    /// The private key PEM of a stored key: opened if sealed, as is if in
    /// clear.
    pub fn reveal(&self, cert_pem: &str, key: &StoredKey) -> Result<String, KekError> {
        match key {
            StoredKey::Sealed(sealed) => self.open(cert_pem, sealed),
            StoredKey::Clear(pem) => Ok(pem.clone()),
        }
    }
}

/// Warns when others may read the KEK file. Group read is allowed: a
/// Kubernetes Secret reaches a non-root broker through its group.
fn warn_if_world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "the key-encryption key file is readable by every user; run chmod 600 on it"
            );
        }
    }
}

/// The associated data of a CA key: the SHA-256 of its certificate's PEM
/// text, under a context string.
fn associated_data(cert_pem: &str) -> [u8; 32] {
    sha2::Sha256::new()
        .chain_update(b"tether CA key\0")
        .chain_update(cert_pem.trim().as_bytes())
        .finalize()
        .into()
}

/// A CA private key as the store keeps it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StoredKey {
    /// Sealed under a KEK (what every broker writes).
    Sealed(SealedKey),
    /// PKCS#8 PEM in clear, as written before keys were sealed: read, and
    /// rewritten sealed.
    Clear(String),
}

impl StoredKey {
    /// Whether the key is sealed.
    pub fn is_sealed(&self) -> bool {
        matches!(self, StoredKey::Sealed(_))
    }

    /// The id of the KEK that sealed it.
    pub fn kek_id(&self) -> Option<&str> {
        match self {
            StoredKey::Sealed(s) => Some(&s.kek),
            StoredKey::Clear(_) => None,
        }
    }
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoredKey::Sealed(s) => write!(f, "Sealed(kek {})", s.kek),
            StoredKey::Clear(_) => f.write_str("Clear(..)"),
        }
    }
}

/// A sealed private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedKey {
    /// The format and algorithm, [`SEALED_FORMAT`].
    pub format: String,
    /// The id of the KEK that sealed it ([`Kek::id`]).
    pub kek: String,
    /// The AES-GCM nonce, base64.
    pub nonce: String,
    /// The ciphertext with its tag, base64.
    pub sealed: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_only_with_its_kek_and_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate(&dir.path().join("kek")).unwrap();
        kek.write_new().unwrap();
        let kek = Kek::load(&dir.path().join("kek")).unwrap();
        let sealed = kek.seal("cert A", "secret").unwrap();
        assert!(!sealed.sealed.contains("secret"));
        assert_eq!(kek.open("cert A", &sealed).unwrap(), "secret");
        assert_eq!(kek.open("cert A\n", &sealed).unwrap(), "secret");

        let other = Kek::generate(&dir.path().join("other")).unwrap();
        let wrong = other.open("cert A", &sealed).unwrap_err();
        assert!(matches!(wrong, KekError::WrongKek { .. }), "{wrong}");
        let text = wrong.to_string();
        assert!(
            text.starts_with(&format!(
                "the CA key cannot be decrypted with {}: wrong key-encryption key?",
                dir.path().join("other").display()
            )),
            "{text}"
        );
        assert!(text.contains(&kek.id()), "{text}");

        let moved = kek.open("cert B", &sealed).unwrap_err();
        assert!(matches!(moved, KekError::Altered(_)), "{moved}");
        let mut flipped = sealed.clone();
        flipped.sealed = data_encoding::BASE64.encode(b"0123456789abcdef0123456789");
        assert!(matches!(
            kek.open("cert A", &flipped).unwrap_err(),
            KekError::Altered(_)
        ));
        let mut newer = sealed;
        newer.format = "tether-sealed-key-v9".into();
        assert!(matches!(
            kek.open("cert A", &newer).unwrap_err(),
            KekError::Format(_)
        ));
    }

    #[test]
    fn kek_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Kek::load(&dir.path().join("none")).unwrap_err();
        assert!(matches!(missing, KekError::Missing(_)), "{missing}");
        let short = dir.path().join("short");
        std::fs::write(&short, data_encoding::BASE64.encode(&[1u8; 16])).unwrap();
        let bad = Kek::load(&short).unwrap_err();
        assert!(
            bad.to_string().contains("is not a key-encryption key"),
            "{bad}"
        );
        let openssl_style = dir.path().join("openssl");
        std::fs::write(
            &openssl_style,
            format!("{}\n", data_encoding::BASE64.encode(&[7u8; 32])),
        )
        .unwrap();
        assert!(Kek::load(&openssl_style).is_ok());
        let kek = Kek::generate(&dir.path().join("k")).unwrap();
        kek.write_new().unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("k"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(kek.write_new().is_err(), "never overwrites");
    }

    #[test]
    fn stored_keys_read_old_clear_records_and_sealed_ones() {
        let clear: StoredKey = serde_json::from_str("\"-----BEGIN PRIVATE KEY-----\"").unwrap();
        assert!(!clear.is_sealed());
        let kek = Kek::generate(Path::new("k")).unwrap();
        let sealed = StoredKey::Sealed(kek.seal("c", "s").unwrap());
        let text = serde_json::to_string(&sealed).unwrap();
        assert!(text.contains(SEALED_FORMAT), "{text}");
        let back: StoredKey = serde_json::from_str(&text).unwrap();
        assert_eq!(back, sealed);
        assert_eq!(kek.reveal("c", &back).unwrap(), "s");
        assert!(!format!("{clear:?}").contains("BEGIN"));
    }
}
