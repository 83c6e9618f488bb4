//! Backup and restore of a broker with the embedded store: a backup taken
//! through the admin API while sites are enrolled and connected, restored
//! into another data directory, serves the same sites at the same
//! addresses under the same CA, and codes used before the backup stay
//! used; a truncated or altered backup is refused with the reason. The
//! real `tether-broker` binary does the same with its `backup` and
//! `restore` commands after its data directory was wiped, and backups it
//! takes while sites enroll concurrently hold every enrolled site complete.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether::state_dir::StateDir;
use tether_broker::backup::{Backup, BackupError};
use tether_broker::store::{CertRecord, SiteRecord};
use tether_proto::ipam::Lease;
use tether_tests::real_broker::{RealBroker, cli, tunnel_at, write_config};
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

#[tokio::test]
async fn the_backup_and_restore_commands_bring_back_a_wiped_broker_with_its_sites() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(dir.path(), &data, "");
    let broker = RealBroker::start(&config, &data).unwrap();
    let mut sites = Vec::new();
    let mut before = BTreeMap::new();
    for name in ["ward-a", "ward-b"] {
        let state = StateDir::new(dir.path().join(name));
        tether::enroll::enroll(
            &broker.tunnel.to_string(),
            &broker.token(name),
            &state,
            false,
            None,
        )
        .await
        .unwrap();
        let tunnel = tunnel_at(broker.tunnel, &state).await;
        before.insert(name, v4(&tunnel));
        sites.push((name, state, tunnel));
    }
    let used = broker.token("ward-c");
    let c = StateDir::new(dir.path().join("ward-c"));
    tether::enroll::enroll(&broker.tunnel.to_string(), &used, &c, false, None)
        .await
        .unwrap();
    let unused = broker.token("ward-d");
    let addresses = broker.addresses();

    let file = dir.path().join("broker.backup");
    let file_arg = file.to_str().unwrap();
    let config_arg = config.to_str().unwrap();
    let (ok, out) = broker.cli(&["backup", "--out", file_arg, "-c", config_arg]);
    assert!(ok, "{out}");
    assert!(out.starts_with(&format!("Wrote {file_arg}")), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the backup is readable by its owner only"
    );
    let (ok, out) = broker.cli(&["backup", "--out", file_arg, "-c", config_arg]);
    assert!(!ok, "a backup never overwrites a file:\n{out}");

    // The machine is lost: only the backup and the key-encryption key,
    // kept apart, remain.
    broker.stop();
    let kek = dir.path().join("kek-kept-apart");
    std::fs::copy(data.join("ca-kek"), &kek).unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    drop(sites.drain(..).map(|(_, _, t)| t).collect::<Vec<_>>());

    let data_arg = data.to_str().unwrap();
    let (ok, out) = cli(
        &["restore", "--from", file_arg, "--data-dir", data_arg],
        None,
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("4 sites")
            && out.contains("1 unused enrollment tokens")
            && out.contains("the CA"),
        "{out}"
    );
    let (ok, out) = cli(
        &["restore", "--from", file_arg, "--data-dir", data_arg],
        None,
    );
    assert!(!ok, "a restore never overwrites a store:\n{out}");

    // Without the key-encryption key it refuses to start, and says why.
    let refused = RealBroker::start(&config, &data)
        .err()
        .expect("no start without the KEK");
    assert!(
        refused.contains("is encrypted, but the key-encryption key file"),
        "{refused}"
    );
    std::fs::copy(&kek, data.join("ca-kek")).unwrap();
    let broker = RealBroker::start(&config, &data).unwrap();
    assert_eq!(
        broker.addresses(),
        addresses,
        "the same sites and addresses"
    );

    // The sites come back with the certificates they have (the same CA
    // signed them), at their addresses, without enrolling again.
    for name in ["ward-a", "ward-b"] {
        let state = StateDir::new(dir.path().join(name));
        let tunnel = tunnel_at(broker.tunnel, &state).await;
        assert_eq!(v4(&tunnel), before[name], "{name}");
    }
    // The code used before the backup stays used; the unused one works.
    let again = StateDir::new(dir.path().join("again"));
    let refused = tether::enroll::enroll(&broker.tunnel.to_string(), &used, &again, false, None)
        .await
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("already used"),
        "{refused:#}"
    );
    let d = StateDir::new(dir.path().join("ward-d"));
    tether::enroll::enroll(&broker.tunnel.to_string(), &unused, &d, false, None)
        .await
        .unwrap();
    broker.stop();
}

/// What a backup holds of each site: (enrolled, certificate records,
/// addresses, an unused token).
type Holdings = BTreeMap<String, (bool, usize, BTreeSet<ipnet::IpNet>, bool)>;

fn holdings(bytes: &[u8]) -> Holdings {
    let (_, dump) = tether_broker::backup::open(bytes).unwrap();
    let mut out = Holdings::new();
    for text in dump.sites.values() {
        let r: SiteRecord = serde_json::from_str(text).unwrap();
        out.entry(r.site.to_string()).or_default().0 = r.enrolled.is_some();
    }
    for text in dump.certs.values() {
        let r: CertRecord = serde_json::from_str(text).unwrap();
        out.entry(r.site.to_string()).or_default().1 += 1;
    }
    for text in dump.leases.values() {
        let l: Lease = serde_json::from_str(text).unwrap();
        out.entry(l.site.to_string())
            .or_default()
            .2
            .insert(l.prefix);
    }
    for text in dump.tokens.values() {
        let t: serde_json::Value = serde_json::from_str(text).unwrap();
        let site = t["site"].as_str().expect("a token names its site");
        out.entry(site.to_string()).or_default().3 = true;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_taken_while_sites_enroll_hold_every_enrolled_site_complete() {
    /// Codes made; sites enroll until a backup caught them half done.
    const SITES: usize = 120;
    const WORKERS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(dir.path(), &data, "");
    let broker = Arc::new(RealBroker::start(&config, &data).unwrap());
    let codes: Vec<(String, String)> = (0..SITES)
        .map(|i| {
            let name = format!("site-{i:03}");
            let code = broker.token(&name);
            (name, code)
        })
        .collect();
    let codes = Arc::new(codes);
    let next = Arc::new(AtomicUsize::new(0));
    // Sites whose enrollment completed, in order.
    let enrolled = Arc::new(Mutex::new(Vec::<String>::new()));
    let enough = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (codes, next, enrolled, enough) = (
            codes.clone(),
            next.clone(),
            enrolled.clone(),
            enough.clone(),
        );
        let addr = broker.tunnel.to_string();
        let states = dir.path().join(format!("worker-{w}"));
        workers.push(tokio::spawn(async move {
            while !enough.load(Ordering::SeqCst) {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((name, code)) = codes.get(i) else {
                    return;
                };
                let state = StateDir::new(states.join(name));
                tether::enroll::enroll(&addr, code, &state, false, None)
                    .await
                    .unwrap();
                enrolled.lock().unwrap().push(name.clone());
            }
        }));
    }

    // Backups with the real command while they enroll, until three caught
    // the enrollment half done and 20 sites had enrolled (or every code is
    // used).
    let backups = {
        let (broker, enrolled, enough) = (broker.clone(), enrolled.clone(), enough.clone());
        let (config, dir) = (config.clone(), dir.path().to_path_buf());
        tokio::task::spawn_blocking(move || {
            let mut taken = Vec::new();
            let mut partial = 0;
            let deadline = Instant::now() + Duration::from_secs(120);
            for i in 0.. {
                assert!(Instant::now() < deadline, "the enrollments took over 120 s");
                let done_before: Vec<String> = enrolled.lock().unwrap().clone();
                if done_before.len() == SITES {
                    break;
                }
                let file = dir.join(format!("backup-{i}"));
                let (ok, out) = broker.cli(&[
                    "backup",
                    "--out",
                    file.to_str().unwrap(),
                    "-c",
                    config.to_str().unwrap(),
                ]);
                assert!(ok, "{out}");
                let bytes = std::fs::read(&file).unwrap();
                let held = holdings(&bytes);
                let in_backup = held.values().filter(|h| h.0).count();
                if in_backup > 0 && in_backup < SITES {
                    partial += 1;
                }
                let done = done_before.len();
                taken.push((done_before, held));
                if partial >= 3 && done >= 20 {
                    enough.store(true, Ordering::SeqCst);
                    break;
                }
            }
            taken
        })
        .await
        .unwrap()
    };
    for w in workers {
        w.await.unwrap();
    }
    let finally = broker.addresses();
    let partial = backups
        .iter()
        .filter(|(_, held)| {
            let n = held.values().filter(|h| h.0).count();
            n > 0 && n < SITES
        })
        .count();
    // Enrollments caught under way: the code spent, no certificate yet.
    let in_flight: usize = backups
        .iter()
        .map(|(_, held)| held.values().filter(|h| !h.0 && !h.3).count())
        .sum();
    println!(
        "{} backups, {partial} taken with the enrollment half done, {in_flight} enrollments caught under way; {} sites enrolled",
        backups.len(),
        enrolled.lock().unwrap().len()
    );
    assert!(partial >= 1, "no backup overlapped the enrollments");

    for (i, (done_before, held)) in backups.iter().enumerate() {
        // Nothing completed before the backup began is missing from it.
        for site in done_before {
            assert!(
                held.get(site).is_some_and(|h| h.0),
                "backup {i}: {site} enrolled before it, not in it"
            );
        }
        for (site, (is_enrolled, certs, addresses, token)) in held {
            if *is_enrolled {
                // Complete: its certificate, its addresses (those it has
                // now), its code spent.
                assert!(
                    *certs >= 1,
                    "backup {i}: {site} enrolled without a certificate"
                );
                let now: BTreeSet<_> = finally[site].iter().copied().collect();
                assert_eq!(addresses, &now, "backup {i}: {site}'s addresses");
                assert!(!token, "backup {i}: {site} enrolled with its code unused");
            } else if *token {
                // Not started: nothing of it but the code.
                assert_eq!(
                    *certs, 0,
                    "backup {i}: {site} has a certificate and an unused code"
                );
            }
        }
    }

    // The last backup restored into a new data directory serves each site
    // it holds as enrolled at the address it had.
    let (_, held) = backups.last().unwrap();
    let file = dir.path().join(format!("backup-{}", backups.len() - 1));
    let restored = dir.path().join("restored");
    let (ok, out) = cli(
        &[
            "restore",
            "--from",
            file.to_str().unwrap(),
            "--data-dir",
            restored.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{out}");
    std::fs::copy(data.join("ca-kek"), restored.join("ca-kek")).unwrap();
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let second = RealBroker::start(&write_config(&other, &restored, ""), &restored).unwrap();
    let mut checked = 0;
    for (site, (is_enrolled, ..)) in held {
        if !is_enrolled {
            continue;
        }
        let worker = (0..WORKERS)
            .map(|w| dir.path().join(format!("worker-{w}")).join(site))
            .find(|p| p.exists())
            .unwrap();
        let tunnel = tunnel_at(second.tunnel, &StateDir::new(worker)).await;
        assert!(
            finally[site].contains(&format!("{}/32", v4(&tunnel)).parse().unwrap()),
            "{site} came back at another address"
        );
        checked += 1;
        if checked == 10 {
            // Ten are enough to show it; each handshake costs time.
            break;
        }
    }
    assert!(checked > 0);
    second.stop();
    Arc::try_unwrap(broker).ok().unwrap().stop();
}
