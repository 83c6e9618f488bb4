//! [`EtcdStore`] against a real etcd server (Debian's `etcd-server`), started
//! per test on loopback ports with a temporary data directory
//! ([`EtcdServer`]).
//!
//! Without `etcd` on PATH the tests print "skipped", except under CI (`CI`
//! set), where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tether_config::broker::EtcdConfig;
use tether_pki::token::{TokenLedger, redeem};
use tether_pki::{Revoked, SiteIdentity, TrustDomain};
use tether_proto::ids::{RegionId, SiteId};
use tether_proto::ipam::{Conflict, Ipam, Plan};
use tether_proto::net::Family;

use super::etcd_server::{EtcdServer, free_port};
use super::*;

/// Deadline of each test body.
const TEST_DEADLINE: Duration = Duration::from_secs(90);

fn open_store(server: &EtcdServer, prefix: &str) -> EtcdStore {
    EtcdStore::open(&server.config(prefix)).unwrap()
}

/// Runs `body` on its own thread and fails the test if it takes longer
/// than [`TEST_DEADLINE`].
fn bounded(body: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        body();
        let _ = tx.send(());
    });
    match rx.recv_timeout(TEST_DEADLINE) {
        Ok(()) => handle.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The body panicked: report its panic.
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("test did not finish within {TEST_DEADLINE:?}")
        }
    }
}

/// The next event on `rx`, waiting at most 10 s.
fn next_event(rx: &mut tokio::sync::broadcast::Receiver<StoreEvent>) -> StoreEvent {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rx.try_recv() {
            Ok(event) => return event,
            Err(tokio::sync::broadcast::error::TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "no store event within 10s");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("watch failed: {e}"),
        }
    }
}

/// A token record as stored: times in whole seconds.
fn stored_form(record: &tether_pki::token::TokenRecord) -> tether_pki::token::TokenRecord {
    StoredToken::from_record(record).into_record(record.hash)
}

fn eu() -> RegionId {
    RegionId::new("eu").unwrap()
}

fn ipam() -> Ipam {
    Ipam::new(BTreeMap::from([(
        eu(),
        vec![
            "100.64.0.0/24".parse().unwrap(),
            "fd00:1::/64".parse().unwrap(),
        ],
    )]))
    .unwrap()
}

/// Allocates (or finds) `site`'s IPv4 address, retrying conflicts.
fn allocate(store: &dyn Store, site: &SiteId) -> ipnet::IpNet {
    for _ in 0..50 {
        let snapshot = store.region_leases(&eu()).unwrap();
        match ipam()
            .site_address(&snapshot, site, &eu(), Family::V4)
            .unwrap()
        {
            Plan::Existing(lease) => return lease.prefix,
            Plan::Allocate(txn) => {
                if store.commit_leases(&txn).unwrap().is_ok() {
                    return txn.put[0].prefix;
                }
            }
        }
    }
    panic!("no allocation after 50 attempts");
}

#[test]
fn etcd_leases_commit_with_compare_and_set_and_survive_reopen() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let store = open_store(&server, "/t/");
        let site = SiteId::new("a").unwrap();
        let snapshot = store.region_leases(&eu()).unwrap();
        assert_eq!(snapshot.version(), 0);
        assert_eq!(store.lease_version(&eu()).unwrap(), 0);
        let Plan::Allocate(txn) = ipam()
            .site_address(&snapshot, &site, &eu(), Family::V4)
            .unwrap()
        else {
            panic!("expected an allocation")
        };
        assert_eq!(store.commit_leases(&txn).unwrap(), Ok(()));
        // The same plan again is stale.
        assert_eq!(
            store.commit_leases(&txn).unwrap(),
            Err(Conflict {
                expected: 0,
                found: 1
            })
        );
        let leased = txn.put[0].prefix;
        drop(store);
        let store = open_store(&server, "/t/");
        let again = store.region_leases(&eu()).unwrap();
        assert_eq!(again.version(), 1);
        assert_eq!(store.lease_version(&eu()).unwrap(), 1);
        assert_eq!(
            again.leases().map(|l| l.prefix).collect::<Vec<_>>(),
            vec![leased]
        );
        assert_eq!(allocate(&store, &site), leased);

        // Two brokers racing for addresses never get the same one.
        let other = open_store(&server, "/t/");
        let (a, b) = (Arc::new(store), Arc::new(other));
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let store: Arc<dyn Store> = if i % 2 == 0 { a.clone() } else { b.clone() };
                std::thread::spawn(move || {
                    (0..4)
                        .map(|j| {
                            allocate(store.as_ref(), &SiteId::new(format!("s{i}-{j}")).unwrap())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.push(leased);
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count, "an address was handed out twice");
        let leases = a.region_leases(&eu()).unwrap();
        assert_eq!(leases.leases().count(), count);
        assert_eq!(leases.version(), count as u64);
    });
}

#[test]
fn etcd_tokens_redeem_once_across_threads_and_brokers() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let brokers = [
            Arc::new(open_store(&server, "/t/")),
            Arc::new(open_store(&server, "/t/")),
        ];
        for round in 0..3 {
            let issued = tether_pki::token::generate(
                SiteId::new(format!("a{round}")).unwrap(),
                eu(),
                SystemTime::now(),
                Duration::from_secs(60),
            );
            brokers[round % 2].put(issued.record.clone()).unwrap();
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (store, secret) = (brokers[i % 2].clone(), issued.secret.clone());
                    std::thread::spawn(move || {
                        redeem(store.as_ref(), &secret, SystemTime::now()).ok()
                    })
                })
                .collect();
            let wins: Vec<_> = handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect();
            assert_eq!(wins.len(), 1, "round {round}");
            assert_eq!(wins[0], stored_form(&issued.record));
            assert_eq!(brokers[0].take(&issued.record.hash).unwrap(), None);
        }
    });
}

/// A redemption whose transaction has committed but whose answer has not
/// yet been looked at leaves a marker that another thread of the same
/// broker reads: that thread must not take the marker for its own lost
/// answer (the token would be redeemed twice).
#[test]
fn etcd_a_redemption_in_flight_is_not_claimed_by_another_thread() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let store = Arc::new(open_store(&server, "/t/"));
        let issued = tether_pki::token::generate(
            SiteId::new("in-flight").unwrap(),
            eu(),
            SystemTime::now(),
            Duration::from_secs(60),
        );
        store.put(issued.record.clone()).unwrap();
        let (answered_tx, answered_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (answered_tx, go_rx) = (
            std::sync::Mutex::new(Some(answered_tx)),
            std::sync::Mutex::new(go_rx),
        );
        *store.on_redemption_answer.lock().unwrap() = Some(Arc::new(move || {
            // Only the first answer is held.
            if let Some(tx) = answered_tx.lock().unwrap().take() {
                tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
            }
        }));
        let first = {
            let (store, secret) = (store.clone(), issued.secret.clone());
            std::thread::spawn(move || redeem(store.as_ref(), &secret, SystemTime::now()).ok())
        };
        answered_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the first redemption was answered");
        // The first redemption's marker is in etcd, its answer held.
        let second = redeem(store.as_ref(), &issued.secret, SystemTime::now()).ok();
        go_tx.send(()).unwrap();
        let first = first.join().unwrap();
        assert_eq!(first, Some(stored_form(&issued.record)));
        assert_eq!(second, None, "the token was redeemed twice");
    });
}

#[test]
fn etcd_a_redemption_whose_answer_was_lost_is_settled_by_the_retry() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let (a, b) = (open_store(&server, "/t/"), open_store(&server, "/t/"));
        let token = |site: &str| {
            tether_pki::token::generate(
                SiteId::new(site).unwrap(),
                eu(),
                SystemTime::now(),
                Duration::from_secs(60),
            )
        };
        // The transaction committed, the answer was lost: the retry at the
        // same broker receives the record, once.
        let lost = token("lost-answer");
        a.put(lost.record.clone()).unwrap();
        a.redeem_unheard(&lost.record.hash, 7, true);
        assert_eq!(
            redeem(&a, &lost.secret, SystemTime::now()).unwrap(),
            stored_form(&lost.record)
        );
        assert!(redeem(&a, &lost.secret, SystemTime::now()).is_err());
        // The marker is deleted once settled (in the background).
        let settled = Instant::now();
        while a.key_count().unwrap() > 0 && settled.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(a.key_count().unwrap(), 0, "the marker was not deleted");
        // Another broker's redemption, or one this broker does not know:
        // the token is used.
        let other = token("other-broker");
        a.put(other.record.clone()).unwrap();
        b.redeem_unheard(&other.record.hash, 9, true);
        assert!(redeem(&a, &other.secret, SystemTime::now()).is_err());
        assert_eq!(
            redeem(&b, &other.secret, SystemTime::now()).unwrap(),
            stored_form(&other.record)
        );
        let stale = token("stale-nonce");
        a.put(stale.record.clone()).unwrap();
        a.redeem_unheard(&stale.record.hash, 11, false);
        assert!(redeem(&a, &stale.secret, SystemTime::now()).is_err());
    });
}

#[test]
fn etcd_a_newer_token_replaces_the_earlier_one() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let store = open_store(&server, "/r/");
        crate::store::check_a_newer_token_replaces_the_earlier_one(&store);
    });
}

#[test]
fn etcd_event_timelines_are_bounded_per_site() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let store = open_store(&server, "/ev/");
        crate::store::check_event_timelines(Arc::new(store));
    });
}

#[test]
fn etcd_records_and_revocations_round_trip() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let store = open_store(&server, "/t/");
        let mut events = store.watch();
        let site = SiteId::new("a").unwrap();
        let record = SiteRecord {
            site: site.clone(),
            region: eu(),
            created: 1,
            enrolled: None,
            revoked: false,
            revoked_at: None,
        };
        assert_eq!(store.site(&site).unwrap(), None);
        store.put_site(&record).unwrap();
        assert_eq!(store.site(&site).unwrap(), Some(record.clone()));
        assert_eq!(store.sites().unwrap(), vec![record]);
        assert_eq!(next_event(&mut events), StoreEvent::Site(site.clone()));
        let id = SiteIdentity::new(TrustDomain::new("t.example").unwrap(), eu(), site.clone());
        store.revoke(&Revoked::Site(id.clone())).unwrap();
        store.revoke(&Revoked::Serial(vec![1, 2, 3])).unwrap();
        let mut revs = store.revocations().unwrap();
        revs.sort();
        assert_eq!(
            revs,
            vec![Revoked::Site(id.clone()), Revoked::Serial(vec![1, 2, 3])]
        );
        store.reinstate(&Revoked::Site(id)).unwrap();
        assert_eq!(
            store.revocations().unwrap(),
            vec![Revoked::Serial(vec![1, 2, 3])]
        );
        for (serial, who) in [("0a", "a"), ("0b", "a"), ("0c", "ab")] {
            store
                .put_cert(&CertRecord {
                    serial: serial.into(),
                    site: SiteId::new(who).unwrap(),
                    region: eu(),
                    not_after: 5,
                    spki_sha256: None,
                })
                .unwrap();
        }
        let serials: Vec<_> = store
            .certs_of(&site)
            .unwrap()
            .into_iter()
            .map(|c| c.serial)
            .collect();
        assert_eq!(serials, ["0a", "0b"]);
    });
}

#[test]
fn etcd_the_ca_state_is_shared_and_swapped_only_from_what_was_read() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let (a, b) = (open_store(&server, "/ca/"), open_store(&server, "/ca/"));
        let mut seen_by_b = b.watch();
        check_the_ca_state_is_swapped_only_from_what_was_read(&a);
        assert_eq!(next_event(&mut seen_by_b), StoreEvent::Ca);
        assert_eq!(b.ca_state().unwrap().as_deref(), Some("second"));
        assert!(!b.swap_ca_state(Some("first"), "third").unwrap());
    });
}

#[test]
fn etcd_watch_carries_another_brokers_changes() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let (a, b) = (open_store(&server, "/t/"), open_store(&server, "/t/"));
        let mut seen_by_b = b.watch();
        let entry = Revoked::Serial(vec![9, 9]);
        a.revoke(&entry).unwrap();
        assert_eq!(
            next_event(&mut seen_by_b),
            StoreEvent::Revoked(entry.clone())
        );
        a.reinstate(&entry).unwrap();
        assert_eq!(next_event(&mut seen_by_b), StoreEvent::Reinstated(entry));
        let site = SiteId::new("x").unwrap();
        a.put_site(&SiteRecord {
            site: site.clone(),
            region: eu(),
            created: 1,
            enrolled: Some(2),
            revoked: false,
            revoked_at: None,
        })
        .unwrap();
        assert_eq!(next_event(&mut seen_by_b), StoreEvent::Site(site.clone()));
        allocate(&a, &site);
        assert_eq!(next_event(&mut seen_by_b), StoreEvent::Leases(eu()));
        let event = tether_proto::events::SiteEvent {
            at: 3,
            broker: "a".into(),
            kind: tether_proto::events::EventKind::Revoked,
        };
        a.append_event(&site, &event, 10).unwrap();
        assert_eq!(next_event(&mut seen_by_b), StoreEvent::Events(site.clone()));
        assert_eq!(b.timeline(&site).unwrap().newest(1), [event]);
    });
}

#[test]
fn etcd_prefixes_are_isolated() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let (a, b) = (
            open_store(&server, "/tether/a/"),
            open_store(&server, "/tether/a2/"),
        );
        let mut seen_by_b = b.watch();
        let site = SiteId::new("s").unwrap();
        let record = SiteRecord {
            site: site.clone(),
            region: eu(),
            created: 1,
            enrolled: None,
            revoked: false,
            revoked_at: None,
        };
        a.put_site(&record).unwrap();
        a.revoke(&Revoked::Serial(vec![1])).unwrap();
        let in_a = allocate(&a, &site);
        let issued = tether_pki::token::generate(
            site.clone(),
            eu(),
            SystemTime::now(),
            Duration::from_secs(60),
        );
        a.put(issued.record.clone()).unwrap();

        assert_eq!(b.sites().unwrap(), vec![]);
        assert_eq!(b.site(&site).unwrap(), None);
        assert_eq!(b.revocations().unwrap(), vec![]);
        assert_eq!(b.region_leases(&eu()).unwrap().version(), 0);
        assert_eq!(b.take(&issued.record.hash).unwrap(), None);
        // b allocates from its own, empty, region: the same first address.
        assert_eq!(allocate(&b, &site), in_a);
        // b's first event is its own allocation: none of a's writes.
        assert_eq!(next_event(&mut seen_by_b), StoreEvent::Leases(eu()));
        assert_eq!(b.key_count().unwrap(), 2);
        assert!(a.take(&issued.record.hash).unwrap().is_some());
    });
}

#[test]
fn etcd_migration_from_the_embedded_store_keeps_every_address() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let redb = RedbStore::open(&path).unwrap();
        let mut addresses = BTreeMap::new();
        for i in 0..20 {
            let site = SiteId::new(format!("site-{i}")).unwrap();
            addresses.insert(site.clone(), allocate(&redb, &site));
            redb.put_site(&SiteRecord {
                site: site.clone(),
                region: eu(),
                created: 10,
                enrolled: Some(11),
                revoked: i == 3,
                revoked_at: None,
            })
            .unwrap();
            redb.put_cert(&CertRecord {
                serial: format!("{i:02x}"),
                site: site.clone(),
                region: eu(),
                not_after: 99,
                spki_sha256: None,
            })
            .unwrap();
            // Timelines of 7 sites (several pages), of different lengths,
            // one trimmed to the retention limit.
            if i % 3 == 0 {
                let count = if i == 9 { 250 } else { i + 1 };
                for n in 0..count {
                    let event = tether_proto::events::SiteEvent {
                        at: 1_000 + n as u64,
                        broker: "b1".into(),
                        kind: tether_proto::events::EventKind::Renewed {
                            not_after: 2_000 + n as u64,
                        },
                    };
                    redb.append_event(&site, &event, tether_proto::events::TIMELINE_LIMIT)
                        .unwrap();
                }
            }
        }
        let timelines = redb.timelines().unwrap();
        assert_eq!(timelines.len(), 7);
        // A released lease: the region's version moves past the lease count.
        let snapshot = redb.region_leases(&eu()).unwrap();
        let gone = snapshot.leases().next().unwrap().prefix;
        redb.commit_leases(&tether_proto::ipam::Txn {
            region: eu(),
            expected_version: snapshot.version(),
            put: vec![],
            delete: vec![gone],
        })
        .unwrap()
        .unwrap();
        addresses.retain(|_, a| *a != gone);
        let id = SiteIdentity::new(
            TrustDomain::new("t.example").unwrap(),
            eu(),
            SiteId::new("site-3").unwrap(),
        );
        redb.revoke(&Revoked::Site(id)).unwrap();
        redb.revoke(&Revoked::Serial(vec![0xab])).unwrap();
        let now = SystemTime::now();
        let live = tether_pki::token::generate(
            SiteId::new("new").unwrap(),
            eu(),
            now,
            Duration::from_secs(3600),
        );
        let expired = tether_pki::token::generate(
            SiteId::new("old").unwrap(),
            eu(),
            now - Duration::from_secs(7200),
            Duration::from_secs(3600),
        );
        redb.put(live.record.clone()).unwrap();
        redb.put(expired.record.clone()).unwrap();
        // The CA state, its key sealed under the deployment's KEK.
        let kek = tether_pki::kek::Kek::generate(&dir.path().join("ca-kek")).unwrap();
        let ca = tether_pki::Ca::generate(TrustDomain::new("t.example").unwrap(), now).unwrap();
        let cert = ca.cert_pem().to_string();
        let sealed = tether_pki::kek::StoredKey::Sealed(kek.seal(&cert, &ca.key_pem()).unwrap());
        let state = tether_pki::rotation::CaState::new(
            tether_pki::rotation::CaPem { cert, key: sealed },
            1,
        );
        assert!(
            redb.swap_ca_state(None, &serde_json::to_string(&state).unwrap())
                .unwrap()
        );
        let mut expected = redb.contents().unwrap();
        assert!(expected.ca.is_some());
        drop(redb);
        expected.tokens.retain(|t| t.hash == live.record.hash);

        let config = server.config("/tether/prod/");
        // With another key-encryption key nothing is written.
        let other = tether_pki::kek::Kek::generate(&dir.path().join("other")).unwrap();
        let refused = migrate(&path, &config, &other, false, now).unwrap_err();
        assert!(
            refused.to_string().contains("wrong key-encryption key?"),
            "{refused}"
        );
        assert_eq!(EtcdStore::open(&config).unwrap().key_count().unwrap(), 0);

        let report = migrate(&path, &config, &kek, false, now).unwrap();
        assert_eq!(report.ca, Some((1, Some(kek.id()))));
        assert_eq!(report.sites, 20);
        assert_eq!(report.certs, 20);
        assert_eq!(report.leases, 19);
        assert_eq!(report.regions, vec![("eu".to_string(), 21)]);
        assert_eq!(report.revocations, 2);
        assert_eq!((report.tokens, report.expired_tokens), (1, 1));
        assert!(report.to_string().contains("sites         20"), "{report}");
        let events = 1 + 4 + 7 + tether_proto::events::TIMELINE_LIMIT + 13 + 16 + 19;
        assert_eq!((report.timelines, report.events), (7, events));
        assert!(
            report
                .to_string()
                .contains(&format!("timelines     7 ({events} events)")),
            "{report}"
        );

        let etcd = EtcdStore::open(&config).unwrap();
        let mut copied = etcd.contents().unwrap();
        for c in [&mut copied, &mut expected] {
            c.sites.sort_by(|a, b| a.site.cmp(&b.site));
            c.certs.sort_by(|a, b| a.serial.cmp(&b.serial));
            c.revocations.sort();
        }
        assert_eq!(copied, expected);
        // Every timeline arrived whole, in order.
        assert_eq!(etcd.timelines().unwrap(), timelines);
        let nine = etcd.timeline(&SiteId::new("site-9").unwrap()).unwrap();
        assert_eq!(nine.len(), tether_proto::events::TIMELINE_LIMIT);
        assert_eq!(nine.events().next().unwrap().at, 1_050);
        // Every site keeps its address, and new allocations go on from the
        // same version.
        for (site, address) in &addresses {
            assert_eq!(allocate(&etcd, site), *address, "{site}");
        }
        assert_eq!(etcd.region_leases(&eu()).unwrap().version(), 21);
        let fresh = allocate(&etcd, &SiteId::new("site-new").unwrap());
        assert!(!addresses.values().any(|a| *a == fresh));
        assert_eq!(etcd.region_leases(&eu()).unwrap().version(), 22);
        // The unexpired token still enrolls, once.
        assert!(redeem(&etcd, &live.secret, SystemTime::now()).is_ok());
        assert!(redeem(&etcd, &live.secret, SystemTime::now()).is_err());

        // A prefix holding data is refused, unless forced.
        let err = migrate(&path, &config, &kek, false, now).unwrap_err();
        assert!(err.to_string().contains("already holds"), "{err}");
        let again = migrate(&path, &config, &kek, true, now).unwrap();
        assert!(again.replaced > 0);
        assert_eq!(etcd.region_leases(&eu()).unwrap().version(), 21);
    });
}

#[test]
fn etcd_store_is_usable_from_any_runtime_flavour() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let site = SiteId::new("rt").unwrap();
        let record = SiteRecord {
            site: site.clone(),
            region: eu(),
            created: 1,
            enrolled: None,
            revoked: false,
            revoked_at: None,
        };
        // Opened, used and dropped inside a current-thread runtime.
        let current = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = server.config("/t/");
        current.block_on(async {
            let store = EtcdStore::open(&config).unwrap();
            store.put_site(&record).unwrap();
            let task = tokio::spawn(async move {
                let found = store.site(&SiteId::new("rt").unwrap()).unwrap();
                drop(store);
                found
            });
            assert!(task.await.unwrap().is_some());
        });
        // Inside a multi-threaded runtime: in block_on, in tasks and in
        // spawn_blocking.
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(open_store(&server, "/t/"));
        multi.block_on(async {
            assert_eq!(store.site(&site).unwrap(), Some(record.clone()));
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let store = store.clone();
                    tokio::spawn(async move { store.sites().unwrap().len() })
                })
                .collect();
            for t in tasks {
                assert_eq!(t.await.unwrap(), 1);
            }
            let store2 = store.clone();
            let n = tokio::task::spawn_blocking(move || store2.sites().unwrap().len())
                .await
                .unwrap();
            assert_eq!(n, 1);
        });
        // The last handle dropped inside the runtime.
        multi.block_on(async move { drop(store) });
    });
}

#[test]
fn calls_to_a_hung_etcd_time_out_and_work_again_when_it_answers() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let mut config = server.config("/t/");
        config.timeout = Duration::from_secs(1);
        let store = EtcdStore::open(&config).unwrap();
        let site = SiteId::new("a").unwrap();
        store
            .put_site(&SiteRecord {
                site: site.clone(),
                region: eu(),
                created: 1,
                enrolled: None,
                revoked: false,
                revoked_at: None,
            })
            .unwrap();
        server.pause();
        let started = Instant::now();
        let err = store.sites().unwrap_err().to_string();
        let waited = started.elapsed();
        assert!(err.contains("no answer to read within 1s"), "{err}");
        assert!(err.contains(server.url()), "{err}");
        assert!(waited >= Duration::from_millis(900), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        let issued = tether_pki::token::generate(
            site.clone(),
            eu(),
            SystemTime::now(),
            Duration::from_secs(60),
        );
        let err = store.take(&issued.record.hash).unwrap_err();
        assert!(err.contains("no answer to token redemption"), "{err}");
        // A broker starting now fails just as clearly.
        let err = EtcdStore::open(&config).unwrap_err().to_string();
        assert!(err.contains("no answer"), "{err}");
        server.resume();
        assert_eq!(store.site(&site).unwrap().map(|r| r.site), Some(site));
    });
}

#[test]
fn the_watch_resumes_after_etcd_restarts() {
    let Some(mut server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let (a, b) = (open_store(&server, "/t/"), open_store(&server, "/t/"));
        let mut seen_by_b = b.watch();
        let first = Revoked::Serial(vec![1]);
        a.revoke(&first).unwrap();
        assert_eq!(next_event(&mut seen_by_b), StoreEvent::Revoked(first));
        server.restart();
        // The clients reconnect by themselves; the first calls may fail
        // while they do.
        let second = Revoked::Serial(vec![2]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = a.revoke(&second) {
            assert!(Instant::now() < deadline, "no write after the restart: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(next_event(&mut seen_by_b), StoreEvent::Revoked(second));
    });
}

#[test]
fn a_watch_that_resumes_past_compacted_history_says_changes_were_lost() {
    let Some(server) = EtcdServer::start(false) else {
        return;
    };
    bounded(move || {
        let gate = super::etcd_server::Gate::new(&server);
        let a = open_store(&server, "/t/");
        let mut config = server.config("/t/");
        config.endpoints = vec![gate.url()];
        let b = EtcdStore::open(&config).unwrap();
        let mut seen_by_b = b.watch();
        let first = Revoked::Serial(vec![1]);
        a.revoke(&first).unwrap();
        assert_eq!(next_event(&mut seen_by_b), StoreEvent::Revoked(first));
        // B's watch is away while a revocation is made and etcd compacts
        // its history past it.
        gate.cut();
        // (etcd keeps the revision it compacts at: a later write makes
        // the revocation's revision one it no longer has.)
        let second = Revoked::Serial(vec![2]);
        a.revoke(&second).unwrap();
        let third = Revoked::Serial(vec![3]);
        a.revoke(&third).unwrap();
        server.compact();
        gate.reopen();
        // The revocation's own notice is gone with the history: B is told
        // that changes were lost, so that its broker reads the store again.
        assert_eq!(next_event(&mut seen_by_b), StoreEvent::Lost);
        assert!(b.revocations().unwrap().contains(&second));
        // And the watch goes on from the compaction's revision.
        assert_eq!(next_event(&mut seen_by_b), StoreEvent::Revoked(third));
        let fourth = Revoked::Serial(vec![4]);
        a.revoke(&fourth).unwrap();
        assert_eq!(next_event(&mut seen_by_b), StoreEvent::Revoked(fourth));
    });
}

#[test]
fn a_failed_open_inside_a_runtime_is_an_error_not_a_panic() {
    // Needs no etcd: TLS with a plaintext URL (which configuration
    // validation refuses) makes the client's connect fail after the store's
    // runtime was started; it must be shut down quietly inside the caller's
    // runtime.
    bounded(|| {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let config = EtcdConfig {
            endpoints: vec![format!("http://127.0.0.1:{}", free_port())],
            prefix: "/t/".into(),
            timeout: Duration::from_millis(500),
            tls: Some(tether_config::broker::EtcdTls {
                ca_file: ca,
                identity: None,
            }),
        };
        for runtime in [
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
        ] {
            let config = config.clone();
            let err = runtime
                .block_on(async { tokio::spawn(async move { EtcdStore::open(&config) }).await })
                .unwrap()
                .unwrap_err()
                .to_string();
            assert!(err.contains("etcd at http://127.0.0.1:"), "{err}");
            assert!(err.contains("connect failed"), "{err}");
        }
    });
}

#[test]
fn an_unreachable_etcd_is_a_clear_error_within_the_timeout() {
    // Needs no etcd: nothing listens on the port.
    bounded(|| {
        let port = free_port();
        let config = EtcdConfig {
            endpoints: vec![format!("http://127.0.0.1:{port}")],
            prefix: "/t/".into(),
            timeout: Duration::from_millis(500),
            tls: None,
        };
        let started = Instant::now();
        let err = EtcdStore::open(&config).unwrap_err().to_string();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(err.contains("etcd"), "{err}");
    });
}

#[test]
fn etcd_over_tls_with_a_client_certificate() {
    let Some(server) = EtcdServer::start(true) else {
        return;
    };
    bounded(move || {
        let store = open_store(&server, "/tls/");
        let issued = tether_pki::token::generate(
            SiteId::new("a").unwrap(),
            eu(),
            SystemTime::now(),
            Duration::from_secs(60),
        );
        store.put(issued.record.clone()).unwrap();
        assert_eq!(
            store.take(&issued.record.hash).unwrap(),
            Some(stored_form(&issued.record))
        );
        // Without a client certificate the server refuses the broker.
        let mut anonymous = server.config("/tls/");
        anonymous.timeout = Duration::from_secs(2);
        if let Some(tls) = &mut anonymous.tls {
            tls.identity = None;
        }
        let err = EtcdStore::open(&anonymous).unwrap_err().to_string();
        assert!(err.contains("etcd at https://127.0.0.1:"), "{err}");
    });
}
