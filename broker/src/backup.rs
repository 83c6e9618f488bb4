//! Backups of a broker with the embedded store: `tether-broker backup`
//! (through the admin API, `GET /v1/backup`, while the broker runs) and
//! `tether-broker restore`.
//!
//! A backup is one JSON document: a format name and version, when it was
//! taken, the content (every table of the store, read in one transaction,
//! as JSON text; the CA state with its keys is one of them) and the
//! SHA-256 of the content. [`open`] refuses a file that is truncated, of
//! another format or version, or whose content does not match its
//! checksum, and says which.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::Digest;
use thiserror::Error;

use crate::store::StoreError;
use crate::store::redb::{Dump, RedbStore};

/// The `format` of a backup.
pub const FORMAT: &str = "tether-broker-backup";
/// The version written, and the only one read.
pub const VERSION: u32 = 1;
/// Largest backup file read.
pub const MAX_BACKUP_BYTES: u64 = 1 << 30;

/// A backup as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format version ([`VERSION`]).
    pub version: u32,
    /// When it was taken, Unix seconds.
    pub created: u64,
    /// SHA-256 of `content`, lowercase hex.
    pub content_sha256: String,
    /// The store's tables, as the JSON text of a [`Dump`].
    pub content: String,
}

/// Why a backup was refused or could not be made.
#[derive(Debug, Error)]
pub enum BackupError {
    /// The file ends early.
    #[error("the backup is truncated (it ends early); take a new one or find a complete copy")]
    Truncated,
    /// Not a backup at all.
    #[error("this is not a tether broker backup: {0}")]
    NotABackup(String),
    /// A version this broker does not read.
    #[error("backup format version {0} is not supported (this broker reads version {VERSION})")]
    Version(u32),
    /// The content does not match its checksum.
    #[error(
        "the backup was altered or damaged: its content does not match its SHA-256 checksum; refusing to restore it"
    )]
    Checksum,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(String),
}

fn sha256_hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(bytes))
}

/// Makes a backup of a store snapshot.
pub fn make(dump: &Dump, created: u64) -> Result<Backup, BackupError> {
    let content =
        serde_json::to_string(dump).map_err(|e| BackupError::Store(StoreError(e.to_string())))?;
    Ok(Backup {
        format: FORMAT.into(),
        version: VERSION,
        created,
        content_sha256: sha256_hex(content.as_bytes()),
        content,
    })
}

/// Checks a backup file's bytes and returns the snapshot it holds.
pub fn open(bytes: &[u8]) -> Result<(Backup, Dump), BackupError> {
    let backup: Backup = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_eof() {
            BackupError::Truncated
        } else {
            BackupError::NotABackup(e.to_string())
        }
    })?;
    if backup.format != FORMAT {
        return Err(BackupError::NotABackup(format!(
            "format {:?}, expected {FORMAT:?}",
            backup.format
        )));
    }
    if backup.version != VERSION {
        return Err(BackupError::Version(backup.version));
    }
    if sha256_hex(backup.content.as_bytes()) != backup.content_sha256 {
        return Err(BackupError::Checksum);
    }
    let dump: Dump = serde_json::from_str(&backup.content)
        .map_err(|e| BackupError::NotABackup(format!("content: {e}")))?;
    Ok((backup, dump))
}

/// What a restore put in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Site records.
    pub sites: usize,
    /// Address leases.
    pub leases: usize,
    /// Enrollment tokens (used ones are gone from the store, so they stay
    /// used).
    pub tokens: usize,
    /// Whether the CA state was in the backup.
    pub ca: bool,
}

/// Restores the backup file `from` into the empty data directory `dir`.
pub fn restore(from: &Path, dir: &Path) -> Result<Restored, BackupError> {
    let io = |e: std::io::Error, what: &Path| BackupError::Io(format!("{}: {e}", what.display()));
    let size = std::fs::metadata(from).map_err(|e| io(e, from))?.len();
    if size > MAX_BACKUP_BYTES {
        return Err(BackupError::NotABackup(format!(
            "{size} bytes, more than the {MAX_BACKUP_BYTES} a backup may have"
        )));
    }
    let bytes = std::fs::read(from).map_err(|e| io(e, from))?;
    let (_, dump) = open(&bytes)?;
    tether_pki::ca::create_private_dir(dir).map_err(|e| BackupError::Io(e.to_string()))?;
    let store = RedbStore::create_from(&dir.join(crate::store::EMBEDDED_FILE), &dump)?;
    drop(store);
    Ok(Restored {
        sites: dump.sites.len(),
        leases: dump.leases.len(),
        tokens: dump.tokens.len(),
        ca: !dump.deployment.is_empty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Dump {
        let mut dump = Dump::default();
        dump.sites
            .insert("ward".into(), "{\"site\":\"ward\"}".into());
        dump.lease_versions.insert("eu".into(), 3);
        dump.deployment.insert("ca".into(), "{}".into());
        dump
    }

    #[test]
    fn a_backup_reads_back_and_a_truncated_or_altered_one_is_refused_with_the_reason() {
        let text = serde_json::to_string(&make(&sample(), 1).unwrap()).unwrap();
        let (backup, dump) = open(text.as_bytes()).unwrap();
        assert_eq!(dump, sample());
        assert_eq!(backup.version, VERSION);

        let truncated = open(&text.as_bytes()[..text.len() / 2]).unwrap_err();
        assert!(matches!(truncated, BackupError::Truncated), "{truncated}");
        assert!(truncated.to_string().contains("truncated"));

        let altered = text.replace("ward", "wird");
        let refused = open(altered.as_bytes()).unwrap_err();
        assert!(matches!(refused, BackupError::Checksum), "{refused}");
        assert!(refused.to_string().contains("altered or damaged"));

        let other = text.replace(FORMAT, "something-else");
        assert!(matches!(
            open(other.as_bytes()).unwrap_err(),
            BackupError::NotABackup(_)
        ));
        let newer = text.replace("\"version\":1", "\"version\":2");
        assert!(matches!(
            open(newer.as_bytes()).unwrap_err(),
            BackupError::Version(2)
        ));
    }

    #[test]
    fn a_restore_refuses_a_data_directory_that_already_has_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.json");
        std::fs::write(
            &file,
            serde_json::to_string(&make(&sample(), 1).unwrap()).unwrap(),
        )
        .unwrap();
        let data = dir.path().join("data");
        let restored = restore(&file, &data).unwrap();
        assert_eq!((restored.sites, restored.ca), (1, true));
        let again = restore(&file, &data).unwrap_err();
        assert!(again.to_string().contains("already exists"), "{again}");
        let store = RedbStore::open(&data.join(crate::store::EMBEDDED_FILE)).unwrap();
        assert_eq!(store.dump().unwrap(), sample());
    }
}
