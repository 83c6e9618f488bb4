//! `tether-broker store migrate`, the binary, against a real etcd (see
//! `src/store/etcd_server.rs`; skipped without etcd outside CI).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../src/store/etcd_server.rs"]
mod etcd_server;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use etcd_server::EtcdServer;
use tether_broker::store::{EtcdStore, RedbStore, SiteRecord, Store};
use tether_pki::token::TokenLedger;
use tether_proto::ids::{RegionId, SiteId};
use tether_proto::ipam::{Ipam, Plan};
use tether_proto::net::Family;

/// Runs `tether-broker store migrate ARGS`: success, and stdout + stderr.
/// Fails the test if the command runs for more than 30 s.
fn migrate(args: &[&str]) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-broker"))
        .arg("store")
        .arg("migrate")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tether-broker store migrate {args:?} ran for more than 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_migrate_command_copies_refuses_a_used_prefix_and_forces() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let redb_path = dir.path().join("store.redb");
    let region = RegionId::new("local").unwrap();
    let ipam = Ipam::new(BTreeMap::from([(
        region.clone(),
        vec!["100.64.0.0/16".parse().unwrap()],
    )]))
    .unwrap();
    let mut addresses = Vec::new();
    {
        let redb = RedbStore::open(&redb_path).unwrap();
        for name in ["hospital-a", "hospital-b"] {
            let site = SiteId::new(name).unwrap();
            redb.put_site(&SiteRecord {
                site: site.clone(),
                region: region.clone(),
                created: 1,
                enrolled: Some(2),
                revoked: false,
                revoked_at: None,
            })
            .unwrap();
            let snapshot = redb.region_leases(&region).unwrap();
            let Plan::Allocate(txn) = ipam
                .site_address(&snapshot, &site, &region, Family::V4)
                .unwrap()
            else {
                panic!("expected an allocation")
            };
            redb.commit_leases(&txn).unwrap().unwrap();
            addresses.push((site, txn.put[0].prefix));
        }
        let issued = tether_pki::token::generate(
            SiteId::new("hospital-c").unwrap(),
            region.clone(),
            SystemTime::now(),
            Duration::from_secs(3600),
        );
        redb.put(issued.record).unwrap();
    }
    let config = server.config("/tether/cli/");
    let etcd_toml = dir.path().join("etcd.toml");
    let kek = dir.path().join("etcd-kek");
    std::fs::write(
        &etcd_toml,
        format!(
            "[ca]\nkey_encryption_key_file = {kek:?}\n[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [{:?}]\nprefix = \"/tether/cli\"\n",
            config.endpoints[0]
        ),
    )
    .unwrap();
    let embedded_toml = dir.path().join("embedded.toml");
    std::fs::write(&embedded_toml, "").unwrap();
    let from = redb_path.to_str().unwrap();
    let to = etcd_toml.to_str().unwrap();

    // The brokers on etcd need the key-encryption key: none, no copy.
    let (ok, text) = migrate(&["--from", from, "--to-config", to]);
    assert!(!ok, "{text}");
    assert!(text.contains("does not exist"), "{text}");
    assert!(text.contains("ca-kek"), "{text}");
    let made = Command::new(env!("CARGO_BIN_EXE_tether-broker"))
        .args(["ca", "new-kek", "--out", kek.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");

    let (ok, text) = migrate(&["--from", from, "--to-config", to]);
    assert!(ok, "{text}");
    assert!(text.contains("CA            none"), "{text}");
    assert!(
        text.contains("Copied into etcd under /tether/cli/"),
        "{text}"
    );
    assert!(text.contains("region local: lease version 2"), "{text}");
    assert!(text.contains("sites         2"), "{text}");
    assert!(
        text.contains("tokens        1 (skipped 0 expired)"),
        "{text}"
    );

    // Every site finds the lease it had.
    let etcd = EtcdStore::open(&config).unwrap();
    for (site, address) in &addresses {
        let snapshot = etcd.region_leases(&region).unwrap();
        let plan = ipam
            .site_address(&snapshot, site, &region, Family::V4)
            .unwrap();
        assert!(matches!(plan, Plan::Existing(_)), "{site}: {plan:?}");
        assert_eq!(plan.lease().map(|l| l.prefix), Some(*address), "{site}");
    }

    let (ok, text) = migrate(&["--from", from, "--to-config", to]);
    assert!(!ok, "{text}");
    assert!(text.contains("already holds"), "{text}");
    assert!(text.contains("--force"), "{text}");

    let (ok, text) = migrate(&["--from", from, "--to-config", to, "--force"]);
    assert!(ok, "{text}");
    assert!(text.contains("replaced"), "{text}");

    let (ok, text) = migrate(&[
        "--from",
        from,
        "--to-config",
        embedded_toml.to_str().unwrap(),
    ]);
    assert!(!ok, "{text}");
    assert!(text.contains("does not use etcd"), "{text}");
}
