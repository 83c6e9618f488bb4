//! Every committed example configuration parses and validates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use tether_config::broker::BrokerFile;
use tether_config::client::ClientFile;
use tether_config::gateway::GatewayFile;

fn examples() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_validates() {
    let files = examples();
    assert!(files.len() >= 4, "examples missing: {files:?}");
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let origin = path.display().to_string();
        if name.starts_with("broker") {
            let config = BrokerFile::load(&path)
                .unwrap()
                .validate(&origin)
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(!config.regions.is_empty());
        } else if name.starts_with("gateway") {
            GatewayFile::load(&path)
                .unwrap()
                .validate(&origin)
                .unwrap_or_else(|e| panic!("{e}"));
        } else if name.starts_with("tether") {
            ClientFile::load(&path)
                .unwrap()
                .validate(&origin)
                .unwrap_or_else(|e| panic!("{e}"));
        } else {
            panic!("{name}: example of unknown kind (name it broker*, gateway* or tether*)");
        }
    }
}

#[test]
fn the_two_region_example_keeps_regions_apart() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/broker.toml");
    let config = BrokerFile::load(&path)
        .unwrap()
        .validate("broker.toml")
        .unwrap();
    let names: Vec<&str> = config.regions.keys().map(|r| r.as_str()).collect();
    assert_eq!(names, ["eu-central", "us-east"]);
    assert!(
        config
            .regions
            .values()
            .all(|r| r.allow_gateways_from.is_empty())
    );
    assert_eq!(config.advertised_names, ["broker-1.tether.example.org"]);
}
