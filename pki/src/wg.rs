//! WireGuard keys of brokers and gateways.
//!
//! Each side generates its own X25519 key on first start and keeps it in a
//! file readable only by its owner (base64, as `wg genkey` writes it); only
//! the public half is ever shown or registered.

use std::path::Path;

use x25519_dalek::{PublicKey, StaticSecret};

use crate::ca::{PkiError, write_new_file};

/// A WireGuard private key.
#[derive(Clone)]
pub struct WgKey {
    secret: StaticSecret,
}

impl std::fmt::Debug for WgKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgKey")
            .field("public", &encode(&self.public()))
            .finish_non_exhaustive()
    }
}

impl WgKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self {
            secret: StaticSecret::from(bytes),
        }
    }

    /// The private key bytes.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.secret).to_bytes()
    }

    /// Reads the key at `path`, creating it (mode 0600) if the file does
    /// not exist. Returns the key and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), PkiError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = decode(&text).ok_or_else(|| PkiError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "not a WireGuard private key (32 bytes in base64)",
                    ),
                })?;
                Ok((
                    Self {
                        secret: StaticSecret::from(bytes),
                    },
                    false,
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                let mut text = encode(&key.secret_bytes());
                text.push('\n');
                write_new_file(path, text.as_bytes(), 0o600)?;
                Ok((key, true))
            }
            Err(source) => Err(PkiError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// A key in WireGuard's text form (standard base64).
pub fn encode(key: &[u8; 32]) -> String {
    data_encoding::BASE64.encode(key)
}

/// Parses WireGuard's text form.
pub fn decode(text: &str) -> Option<[u8; 32]> {
    data_encoding::BASE64
        .decode(text.trim().as_bytes())
        .ok()?
        .try_into()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_once_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wireguard.key");
        let (a, created) = WgKey::load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = WgKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.public(), b.public());
        assert_eq!(decode(&encode(&a.public())), Some(a.public()));
        std::fs::write(&path, "garbage").unwrap();
        assert!(WgKey::load_or_create(&path).is_err());
    }

    #[test]
    fn public_key_matches_wg_pubkey() {
        // RFC 7748 section 6.1 test vector (Alice).
        let secret = data_encoding::HEXLOWER
            .decode(b"77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
            .unwrap();
        let key = WgKey {
            secret: StaticSecret::from(<[u8; 32]>::try_from(secret).unwrap()),
        };
        assert_eq!(
            data_encoding::HEXLOWER.encode(&key.public()),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }
}
