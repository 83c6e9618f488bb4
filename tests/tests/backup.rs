//! Backup and restore of a broker with the embedded store: a backup taken
//! through the admin API while sites are enrolled and connected, restored
//! into another data directory, serves the same sites at the same
//! addresses under the same CA, and codes used before the backup stay
//! used; a truncated or altered backup is refused with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tether_broker::backup::{Backup, BackupError};
use tether_tests::{TestBroker, TestSite, tunnel_for, v4};

/// A backup through the admin API, as `tether-broker backup` takes it.
async fn take(broker: &TestBroker) -> Vec<u8> {
    let addr = broker.running.as_ref().unwrap().admin_addr;
    let token = broker.broker().admin_token.clone();
    tokio::task::spawn_blocking(move || {
        let client = tether_shell::operator::AdminClient::new(&format!("http://{addr}"), &token);
        let backup: Backup = client.get("/v1/backup").unwrap();
        serde_json::to_vec(&backup).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_restored_broker_serves_the_same_sites_at_the_same_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestBroker::start("").await;
    let a = TestSite::enroll(&first, "ward-a").await;
    let b = TestSite::enroll(&first, "ward-b").await;
    let ta = tunnel_for(&first, &a).await;
    let tb = tunnel_for(&first, &b).await;
    let (addr_a, addr_b) = (v4(&ta), v4(&tb));
    // A code used before the backup, and one created but not used.
    let used = first.token("ward-c").await;
    let c = tether::state_dir::StateDir::new(dir.path().join("c"));
    tether::enroll::enroll(&first.addr().to_string(), &used, &c, false, None)
        .await
        .unwrap();
    let unused = first.token("ward-d").await;
    let ca = first.broker().ca.cert_der();

    let bytes = take(&first).await;
    drop((ta, tb));
    // The backup carries the CA key only sealed under the key-encryption
    // key, which stays out of it.
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("PRIVATE KEY"), "no CA key in clear");
    let kek = first.config.data_dir.clone().unwrap().join("ca-kek");
    let kek_text = std::fs::read_to_string(&kek).unwrap();
    assert!(!text.contains(kek_text.trim()), "no key-encryption key");
    let file = dir.path().join("broker.backup");
    std::fs::write(&file, &bytes).unwrap();
    let data = dir.path().join("restored");
    let restored = tether_broker::backup::restore(&file, &data).unwrap();
    assert!(restored.ca);
    assert_eq!(restored.sites, 4);

    // Without the key-encryption key the restored broker refuses to start
    // and says why; with it (copied as docs/operations.md says) it serves.
    let mut config = first.config.clone();
    config.data_dir = Some(data.clone());
    let refused = tether_broker::run::start(config).await.err().unwrap();
    assert!(
        format!("{refused:#}").contains("is encrypted, but the key-encryption key file"),
        "{refused:#}"
    );
    std::fs::copy(&kek, data.join("ca-kek")).unwrap();

    let second = TestBroker::start_with("", |c| c.data_dir = Some(data.clone())).await;
    assert_eq!(second.broker().ca.cert_der(), ca, "the same CA");
    assert!(!second.running.as_ref().unwrap().created);
    let ta = tunnel_for(&second, &a).await;
    let tb = tunnel_for(&second, &b).await;
    assert_eq!((v4(&ta), v4(&tb)), (addr_a, addr_b));

    // The used code stays used; the unused one still works.
    let again = tether::state_dir::StateDir::new(dir.path().join("again"));
    let refused = tether::enroll::enroll(&second.addr().to_string(), &used, &again, false, None)
        .await
        .unwrap_err();
    println!("{refused:#}");
    assert!(!again.is_enrolled());
    let d = tether::state_dir::StateDir::new(dir.path().join("d"));
    tether::enroll::enroll(&second.addr().to_string(), &unused, &d, false, None)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_truncated_or_altered_backup_is_refused_with_the_reason() {
    let broker = TestBroker::start("").await;
    let _site = TestSite::enroll(&broker, "ward-t").await;
    let bytes = take(&broker).await;
    let dir = tempfile::tempdir().unwrap();

    let truncated = dir.path().join("truncated");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = tether_broker::backup::restore(&truncated, &dir.path().join("t")).unwrap_err();
    assert!(matches!(e, BackupError::Truncated), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
    assert!(!dir.path().join("t").join("store.redb").exists());

    // One character of the content changed.
    let text = String::from_utf8(bytes.clone()).unwrap();
    let altered = text.replacen("ward-t", "ward-x", 1);
    assert_ne!(altered, text);
    let file = dir.path().join("altered");
    std::fs::write(&file, altered).unwrap();
    let e = tether_broker::backup::restore(&file, &dir.path().join("a")).unwrap_err();
    assert!(matches!(e, BackupError::Checksum), "{e}");
    assert!(e.to_string().contains("altered or damaged"), "{e}");
    assert!(!dir.path().join("a").join("store.redb").exists());
}
