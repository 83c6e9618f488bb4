//! A host on the hospital LAN behind a site: the site's LAN interface
//! (`eth0`, 192.168.1.10/24, towards the firewall at 192.168.1.1) is put
//! on a bridge `br-lan` together with a veth to a new namespace, the LAN
//! host.
//!
//! ```text
//! site: bridge br-lan 192.168.1.10
//!       ├── eth0 (to the firewall)
//!       └── host20 ── lanhost eth0 (the given addresses)
//! ```

use std::io;

use crate::{NetNs, run};

/// Bridges the site's LAN interface with a new LAN host namespace whose
/// `eth0` carries `addrs` (CIDR notation, on 192.168.1.0/24) and routes
/// through the firewall; returns that namespace.
pub fn add_lan_host(site: &NetNs, addrs: &[&str]) -> io::Result<NetNs> {
    bridge_site_lan(site)?;
    let host = NetNs::new("lanhost")?;
    run(
        "ip",
        &[
            "-n",
            site.name(),
            "link",
            "add",
            "host20",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            host.name(),
        ],
    )?;
    site.run("ip", &["link", "set", "host20", "master", "br-lan"])?;
    site.run("ip", &["link", "set", "host20", "up"])?;
    for addr in addrs {
        host.run("ip", &["addr", "add", addr, "dev", "eth0"])?;
    }
    host.run("ip", &["link", "set", "eth0", "up"])?;
    host.run("ip", &["route", "add", "default", "via", "192.168.1.1"])?;
    Ok(host)
}

/// Puts the site's LAN interface `eth0` (192.168.1.10/24) on a bridge
/// `br-lan`, the hospital's switch, keeping its address and its default
/// route through the firewall.
pub fn bridge_site_lan(site: &NetNs) -> io::Result<()> {
    for args in [
        &["link", "add", "br-lan", "type", "bridge"][..],
        &["link", "set", "br-lan", "up"],
        &["addr", "del", "192.168.1.10/24", "dev", "eth0"],
        &["link", "set", "eth0", "master", "br-lan"],
        &["addr", "add", "192.168.1.10/24", "dev", "br-lan"],
        &["route", "add", "default", "via", "192.168.1.1"],
    ] {
        site.run("ip", args)?;
    }
    Ok(())
}
