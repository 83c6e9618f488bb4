//! `tether-broker store migrate` as docs/etcd.md tells an operator to run
//! it: the real `tether-broker` binary serving on its embedded store, with
//! a site enrolled by the real `tether enroll` and connected, a site
//! revoked and a code made but not used; the broker stopped; the store
//! copied by the command into a real etcd (started by the test on
//! loopback, see `broker/src/store/etcd_server.rs`); the broker started on
//! etcd with the same data directory and port. The site connects with the
//! certificate it has, at its address, without enrolling again; the
//! revoked site stays refused; the unused code redeems once; a second
//! migration is refused. The mistakes an operator can make (the broker
//! still running, etcd unreachable, no store at the path given, a wrong or
//! missing key-encryption key) end with a non-zero exit and the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use tether::state_dir::StateDir;
use tether_broker::store::{EMBEDDED_FILE, EtcdStore};
use tether_config::broker::DEFAULT_KEK_FILE;
use tether_tests::etcd::EtcdServer;
use tether_tests::real_broker::{
    Output, RealBroker, broker_command, run_bounded, tunnel_at, write_config,
    write_config_listening,
};
use tether_tests::{Tunnel, binary, connect_trusting, v4};

/// The deployment's key prefix in etcd.
const PREFIX: &str = "/tether/prod/";

/// `tether-broker store migrate --from FROM --to-config CONFIG`, exactly as
/// docs/etcd.md writes it.
fn migrate(from: &Path, to_config: &Path) -> Output {
    broker_command(
        &[
            "store",
            "migrate",
            "--from",
            from.to_str().unwrap(),
            "--to-config",
            to_config.to_str().unwrap(),
        ],
        None,
    )
}

/// The `[ca]` and `[store]` tables of a broker on etcd at `url`.
fn etcd_tables(kek: &Path, url: &str, timeout: &str) -> String {
    format!(
        "[ca]\nkey_encryption_key_file = {kek:?}\n\
         [store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [{url:?}]\nprefix = {PREFIX:?}\n\
         timeout = {timeout:?}\n"
    )
}

/// `tether enroll` with `code` into `state`.
fn tether_enroll(broker: std::net::SocketAddr, code: &str, state: &Path) -> Output {
    let mut command = Command::new(binary("tether"));
    command.args([
        "enroll",
        "--broker",
        &broker.to_string(),
        "--token",
        code,
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    run_bounded(command)
}

/// The value of the report line `  <label>  <value>`.
fn report_value<'a>(report: &'a str, label: &str) -> &'a str {
    report
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {label:?} in the report:\n{report}"))
}

/// Each site's addresses, whether it is revoked, whether it enrolled, as
/// the broker's admin API says.
type Summary = BTreeMap<String, (Vec<ipnet::IpNet>, bool, bool)>;

fn summary(broker: &RealBroker) -> Summary {
    broker
        .sites()
        .into_iter()
        .map(|s| (s.site.to_string(), (s.addresses, s.revoked, s.enrolled)))
        .collect()
}

/// How many keys etcd holds under the deployment's prefix.
async fn keys_in_etcd(server: &EtcdServer) -> u64 {
    let config = server.config(PREFIX);
    tokio::task::spawn_blocking(move || EtcdStore::open(&config).unwrap().key_count().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn store_migrate_moves_an_embedded_broker_to_etcd_and_no_site_enrolls_again() {
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let embedded_dir = dir.path().join("embedded");
    std::fs::create_dir(&embedded_dir).unwrap();
    let embedded_config = write_config(&embedded_dir, &data, "");
    let broker = RealBroker::start(&embedded_config, &data).unwrap();
    let config_arg = embedded_config.to_str().unwrap();

    // ward-a: a code from `tether-broker token create`, enrolled by the
    // agent's `tether enroll`, connected.
    let (ok, out) = broker.cli(&[
        "token", "create", "--site", "ward-a", "--region", "local", "-c", config_arg,
    ]);
    assert!(ok, "{out}");
    let code = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("tt1-"))
        .unwrap_or_else(|| panic!("no code in:\n{out}"))
        .to_string();
    let a_dir = dir.path().join("ward-a");
    let enrolled = tether_enroll(broker.tunnel, &code, &a_dir);
    assert!(enrolled.success, "{enrolled:?}");
    assert!(
        enrolled
            .stdout
            .contains("this site is ward-a in region local"),
        "{enrolled:?}"
    );
    let a = StateDir::new(a_dir.clone());
    let a_chain = a.credentials().unwrap().chain;
    let tunnel = tunnel_at(broker.tunnel, &a).await;
    let a_address = v4(&tunnel);

    // ward-b: enrolled, connected, revoked with `tether-broker site revoke`.
    let b = StateDir::new(dir.path().join("ward-b"));
    broker.enroll("ward-b", &b).await;
    let b_tunnel = tunnel_at(broker.tunnel, &b).await;
    let (ok, out) = broker.cli(&[
        "site", "revoke", "--site", "ward-b", "--region", "local", "-c", config_arg,
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("Site ward-b in region local is revoked; its tunnel was closed."),
        "{out}"
    );
    drop(b_tunnel);

    // ward-c: a code made and not used.
    // (The admin API is in another process: a blocking call is fine.)
    let unused = broker.token("ward-c");
    let sites = summary(&broker);
    assert_eq!(
        sites.keys().collect::<Vec<_>>(),
        ["ward-a", "ward-b", "ward-c"],
        "{sites:?}"
    );
    assert!(sites["ward-b"].1 && !sites["ward-a"].1, "{sites:?}");
    assert!(sites["ward-a"].2 && !sites["ward-c"].2, "{sites:?}");
    assert!(!sites["ward-a"].0.is_empty() && !sites["ward-b"].0.is_empty());

    // The configuration on etcd, as docs/etcd.md says: the same data
    // directory (admin token, QUIC keys) and tunnel port, the embedded
    // broker's key-encryption key copied to where the configuration says.
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let kek = etc.join("ca-kek");
    std::fs::copy(data.join(DEFAULT_KEK_FILE), &kek).unwrap();
    let etcd_config = write_config_listening(
        &etc,
        &data,
        &broker.tunnel.to_string(),
        &etcd_tables(&kek, server.url(), "5s"),
    );
    let store = data.join(EMBEDDED_FILE);

    // Step 1 forgotten: the running broker holds the store; the command
    // says so and writes nothing.
    let early = migrate(&store, &etcd_config);
    assert!(!early.success, "{early:?}");
    assert_eq!(early.code, Some(1), "{early:?}");
    assert!(
        early
            .stderr
            .contains(&format!("migration from {} failed", store.display()))
            && early.stderr.contains("is in use by another process"),
        "{early:?}"
    );
    assert_eq!(keys_in_etcd(&server).await, 0, "nothing written");

    drop(tunnel);
    let old_tunnel = broker.tunnel;
    broker.stop();

    // The migration.
    let copied = migrate(&store, &etcd_config);
    assert!(copied.success, "{copied:?}");
    assert_eq!(copied.code, Some(0));
    let report = copied.stdout.as_str();
    println!("{report}");
    assert!(
        report.starts_with(&format!("Copied into etcd under {PREFIX}:\n")),
        "{report}"
    );
    assert!(
        report.contains("  region local: lease version "),
        "{report}"
    );
    let leases: usize = sites.values().map(|s| s.0.len()).sum();
    assert_eq!(
        report_value(report, "leases"),
        leases.to_string(),
        "{report}"
    );
    assert_eq!(report_value(report, "sites"), "3", "{report}");
    assert_eq!(report_value(report, "certificates"), "2", "{report}");
    assert_eq!(report_value(report, "revocations"), "1", "{report}");
    assert_eq!(
        report_value(report, "tokens"),
        "1 (skipped 0 expired)",
        "{report}"
    );
    assert!(
        report_value(report, "CA")
            .starts_with("1 certificates with their keys, encrypted with key-encryption key "),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "Point every broker's configuration at etcd ({}) and start them.",
            etcd_config.display()
        )),
        "{report}"
    );
    assert!(copied.stderr.is_empty(), "{copied:?}");
    assert!(store.is_file(), "the embedded store is kept");

    // The broker on etcd, at the same port, with the same sites and
    // addresses.
    let on_etcd = RealBroker::start(&etcd_config, &data).unwrap();
    assert_eq!(on_etcd.tunnel, old_tunnel);
    assert_eq!(
        summary(&on_etcd),
        sites,
        "the same sites, addresses, revocation and enrollment"
    );

    // ward-a connects with the certificate it has, at its address.
    let tunnel = tunnel_at(on_etcd.tunnel, &a).await;
    assert_eq!(v4(&tunnel), a_address);
    assert_eq!(
        a.credentials().unwrap().chain,
        a_chain,
        "no new certificate"
    );

    // ward-b stays revoked.
    let c = b.credentials().unwrap();
    let refused = match connect_trusting(on_etcd.tunnel, &c.bundle, Some((c.chain, c.key))).await {
        Err(e) => format!("{e:#}"),
        Ok(client) => match Tunnel::open(client).await {
            Err((status, body)) => format!("{status} {body}"),
            Ok(_) => panic!("the revoked site opened a tunnel at the broker on etcd"),
        },
    };
    println!("ward-b refused: {refused}");

    // ward-c's code, made before the migration, redeems once.
    let c_dir = dir.path().join("ward-c");
    let enrolled = tether_enroll(on_etcd.tunnel, &unused, &c_dir);
    assert!(enrolled.success, "{enrolled:?}");
    assert!(
        enrolled
            .stdout
            .contains("this site is ward-c in region local"),
        "{enrolled:?}"
    );
    let again = tether_enroll(on_etcd.tunnel, &unused, &dir.path().join("ward-c-again"));
    assert!(!again.success, "a code redeemed twice: {again:?}");
    assert!(again.stderr.contains("already used"), "{again:?}");
    // ward-a's code was spent before the migration and stays spent.
    let spent = tether_enroll(on_etcd.tunnel, &code, &dir.path().join("ward-a-again"));
    assert!(!spent.success, "a spent code redeemed: {spent:?}");
    assert!(
        spent
            .stderr
            .contains("the enrollment token is unknown or was already used"),
        "{spent:?}"
    );

    // A second migration is refused: etcd already holds the deployment.
    let held = keys_in_etcd(&server).await;
    let second = migrate(&store, &etcd_config);
    assert!(!second.success, "{second:?}");
    assert_eq!(second.code, Some(1), "{second:?}");
    assert!(
        second.stderr.contains(&format!(
            "etcd prefix {PREFIX} already holds {held} keys; refusing to mix two stores (pass --force to delete them and copy anyway)"
        )),
        "{second:?}"
    );
    assert!(second.stdout.is_empty(), "{second:?}");
    // Nothing changed: ward-c, enrolled since, is still there.
    assert_eq!(keys_in_etcd(&server).await, held);
    let tunnel_c = tunnel_at(on_etcd.tunnel, &StateDir::new(c_dir)).await;
    assert_ne!(v4(&tunnel_c), a_address);

    drop((tunnel, tunnel_c));
    on_etcd.stop();
    drop(server);
}

#[tokio::test]
async fn store_migrate_says_what_is_wrong_and_exits_non_zero() {
    // A real embedded store: a broker that ran once, then stopped.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = RealBroker::start(&write_config(dir.path(), &data, ""), &data).unwrap();
    let site = StateDir::new(dir.path().join("ward-e"));
    broker.enroll("ward-e", &site).await;
    broker.stop();
    let store = data.join(EMBEDDED_FILE);
    let kek = data.join(DEFAULT_KEK_FILE);

    // etcd unreachable: a loopback port nothing listens on.
    let nobody = format!("http://127.0.0.1:{}", tether_tests::etcd::free_port());
    let unreachable = dir.path().join("unreachable");
    std::fs::create_dir(&unreachable).unwrap();
    let config = write_config(&unreachable, &data, &etcd_tables(&kek, &nobody, "2s"));
    let out = migrate(&store, &config);
    println!("etcd unreachable: {out:?}");
    assert!(!out.success, "{out:?}");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.starts_with("tether-broker: ")
            && out
                .stderr
                .contains(&format!("migration from {} failed", store.display()))
            && out.stderr.contains(&format!("etcd at {nobody}")),
        "{out:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");

    // The store is not where the command was told.
    let missing = dir.path().join("elsewhere").join(EMBEDDED_FILE);
    let out = migrate(&missing, &config);
    println!("no store: {out:?}");
    assert!(!out.success, "{out:?}");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("{} does not exist", missing.display())),
        "{out:?}"
    );
    assert!(!missing.exists(), "no store made at the path given");

    // The data directory given instead of the store file in it.
    let out = migrate(&data, &config);
    println!("a directory: {out:?}");
    assert!(!out.success, "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("{} is a directory", data.display()))
            && out.stderr.contains(&store.display().to_string()),
        "{out:?}"
    );

    // The configuration names a key-encryption key file not copied there.
    let absent_kek = dir.path().join("etc-ca-kek");
    let no_kek = dir.path().join("no-kek");
    std::fs::create_dir(&no_kek).unwrap();
    let config = write_config(&no_kek, &data, &etcd_tables(&absent_kek, &nobody, "2s"));
    let out = migrate(&store, &config);
    println!("no key-encryption key: {out:?}");
    assert!(!out.success, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "{} does not exist: the brokers on etcd open the CA keys with it; copy the key-encryption key of the embedded store ({}) there first",
            absent_kek.display(),
            kek.display()
        )),
        "{out:?}"
    );

    // Another key-encryption key than the embedded broker's.
    let (ok, out) = tether_tests::real_broker::cli(
        &["ca", "new-kek", "--out", absent_kek.to_str().unwrap()],
        None,
    );
    assert!(ok, "{out}");
    let out = migrate(&store, &config);
    println!("another key-encryption key: {out:?}");
    assert!(!out.success, "{out:?}");
    assert!(
        out.stderr.contains("wrong key-encryption key?")
            && out.stderr.contains(
                "the brokers on etcd must use the key-encryption key of the embedded store"
            ),
        "{out:?}"
    );

    // A configuration still on the embedded store.
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let config = write_config(&plain, &data, "");
    let out = migrate(&store, &config);
    assert!(!out.success, "{out:?}");
    assert!(
        out.stderr
            .contains("does not use etcd: set [store] backend = \"etcd\""),
        "{out:?}"
    );
}
