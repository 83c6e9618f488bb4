//! A real etcd per test for the brokers of one fleet: the server of
//! `broker/src/store/etcd_server.rs` (Debian's `etcd-server` on loopback
//! ports, killed on drop), and the configuration of a broker that reaches
//! it through a [`Gate`] (a TCP relay the test cuts or holds).

#[path = "../../broker/src/store/etcd_server.rs"]
mod server;

pub use server::{EtcdServer, Gate, free_port};

/// A real etcd for one test (`None`: etcd is not installed and the test
/// is skipped, as [`EtcdServer::start`] decides).
pub async fn start_etcd() -> Option<EtcdServer> {
    tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
}

/// The configuration of a broker reaching `server` at `url` (its gate's)
/// under `prefix`, with a store timeout of one second.
pub fn gated_toml(server: &EtcdServer, url: &str, prefix: &str) -> String {
    format!(
        "{}[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [{url:?}]\nprefix = {prefix:?}\ntimeout = \"1s\"\n",
        server.ca_toml()
    )
}
