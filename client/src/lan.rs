//! The hospital LANs behind the site: packets translated between each LAN
//! and the prefix the broker mapped it to, and the kernel set up to forward
//! between the tunnel device and the LANs.
//!
//! The translation is [`LanMap`]'s (`tether_proto::netmap`), decided by the
//! agent core; here it is applied to every packet crossing the device:
//! [`LanPath::to_device`] on packets from the tunnel, [`LanPath::from_lan`]
//! on packets read from the device. A packet from the tunnel goes to the
//! device only if it is for the site ([`Inbound`]): to one of its own
//! addresses, or to a mapped prefix, translated. A packet refused either
//! way is dropped and counted by [`Refused::as_str`].
//!
//! The kernel forwards the translated packets between the device and the
//! LAN interface (the LAN is directly connected, so it has the route; the
//! replies find the overlay pools' routes through the device). By default
//! it also rewrites the source of tunnel traffic entering a LAN to this
//! host's own address there ([`SourceRewrite`]): LAN hosts answer their
//! default router, not this host, unless the reply is addressed to this
//! host itself. Only the kernel can do that, because the reply must reach
//! this host's own address and be matched back to its flow (conntrack).
//! The rule lives in a table of its own, `inet tether_site_<device>`,
//! loaded with the `nft` command (`nft -f -`, one atomic transaction) and
//! deleted on exit; it marks no packets and touches no other table, so it
//! coexists with the host's own rules (or Cilium's). The same table
//! carries the forwarding of announced services to their targets in the
//! edge cluster ([`SiteTable`], targets resolved by `crate::expose`).

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::IpNet;
use tether_proto::netmap::{Inbound, LanMap, Refused};

/// The least time between two warnings about dropped packets.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The site's addresses and LAN map in force, and what they refused;
/// shared by the packet pumps.
#[derive(Debug, Default)]
pub struct LanPath {
    inbound: RwLock<Arc<Inbound>>,
    /// Counted in the order of [`Refused::ALL`].
    drops: [AtomicU64; Refused::ALL.len()],
    last_warn: Mutex<Option<Instant>>,
    /// Where the warnings also go, for the site's timeline.
    problems: crate::report::Problems,
}

impl LanPath {
    /// A path whose drop warnings are also reported to the broker.
    pub fn reporting(problems: crate::report::Problems) -> Self {
        Self {
            problems,
            ..Self::default()
        }
    }

    /// Translate with `map` from now on.
    pub fn set(&self, map: LanMap) {
        if let Ok(mut m) = self.inbound.write() {
            *m = Arc::new(m.with_map(map));
        }
    }

    /// The broker assigned `addresses` (the site's own, and its mapped
    /// LANs): packets to the site's own addresses go to the device from now
    /// on.
    pub fn set_assigned(&self, addresses: &[IpNet]) {
        if let Ok(mut m) = self.inbound.write() {
            *m = Arc::new(m.with_assigned(addresses));
        }
    }

    /// The addresses and map in force (cheap: the pumps take them once per
    /// batch).
    pub fn current(&self) -> Arc<Inbound> {
        self.inbound.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// Lets a packet from the tunnel through to the device, translated
    /// into the LAN; `false`: drop it.
    pub fn to_device(&self, inbound: &Inbound, packet: &mut [u8]) -> bool {
        self.count(inbound.to_device(packet))
    }

    /// Whether a packet from the tunnel may go to the device as it is
    /// (there are no LANs to translate it into; `false`: drop it).
    pub fn admits(&self, inbound: &Inbound, packet: &[u8]) -> bool {
        self.count(inbound.admits(packet))
    }

    /// Translates a packet read from the device for the tunnel; `false`:
    /// drop it.
    pub fn from_lan(&self, inbound: &Inbound, packet: &mut [u8]) -> bool {
        let map = inbound.map();
        map.is_empty() || self.count(map.from_lan(packet))
    }

    /// The packets dropped so far, by reason label.
    pub fn drops(&self) -> Vec<(&'static str, u64)> {
        Refused::ALL
            .iter()
            .zip(&self.drops)
            .map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed)))
            .collect()
    }

    fn count<T>(&self, outcome: Result<T, Refused>) -> bool {
        let Err(refused) = outcome else {
            return true;
        };
        let slot = Refused::ALL
            .iter()
            .position(|r| r.as_str() == refused.as_str())
            .unwrap_or_default();
        self.drops[slot].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(reason = refused.as_str(), "packet dropped: {refused}");
        let now = Instant::now();
        if let Ok(mut last) = self.last_warn.lock()
            && last.is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            *last = Some(now);
            let counts: Vec<String> = self
                .drops()
                .iter()
                .map(|(label, n)| format!("{label}={n}"))
                .collect();
            let counts = counts.join(" ");
            tracing::warn!(
                drops = counts,
                "packets were dropped between the tunnel and the device: not for this site (not_for_site), or they cannot be translated into or out of a LAN"
            );
            self.problems.push(
                tether_proto::report::ProblemKind::Translation,
                format!("packets were dropped between the tunnel and the device since the agent started, by reason: {counts}"),
            );
        }
        false
    }
}

/// A port the agent forwards, with the address it goes to (one rule per
/// address family of the target).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Forwarded {
    /// The port on the site's overlay addresses.
    pub port: u16,
    /// Where TCP and UDP to that port go.
    pub to: SocketAddr,
}

/// The site's nftables table: tunnel traffic entering the LANs leaves
/// from this host's own LAN address, and traffic to a forwarded service's
/// port on the overlay addresses goes to its target in the edge cluster.
/// Loaded whole on every change (one transaction), only once there is a
/// rule to load, and deleted when dropped.
#[derive(Debug)]
pub struct SiteTable {
    device: String,
    lans: Vec<IpNet>,
    overlay: Vec<IpAddr>,
    forwards: Vec<Forwarded>,
    installed: bool,
}

/// The name of the device's table: `tether_site_<device>`, with characters
/// nftables identifiers do not take replaced.
pub fn table_name(device: &str) -> String {
    let dev: String = device
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("tether_site_{dev}")
}

/// The nftables script that (re)creates the table in one transaction with
/// the source rewrite for `lans` only.
pub fn rewrite_script(device: &str, lans: &[IpNet]) -> String {
    table_script(device, lans, &[], &[])
}

/// The nftables script that (re)creates the table in one transaction:
/// packets from `device` to one of `lans` leave with the address of the
/// interface they leave by (`masquerade`); TCP and UDP from `device` to a
/// forwarded port of an `overlay` address go to its target (`dnat`, same
/// address family only) and leave with this host's address too, so that
/// the replies come back through the agent, which undoes both
/// translations (conntrack).
pub fn table_script(
    device: &str,
    lans: &[IpNet],
    overlay: &[IpAddr],
    forwards: &[Forwarded],
) -> String {
    let table = table_name(device);
    let mut rules = String::new();
    for (family, v6) in [("ip", false), ("ip6", true)] {
        let nets: Vec<String> = lans
            .iter()
            .filter(|l| matches!(l, IpNet::V6(_)) == v6)
            .map(ToString::to_string)
            .collect();
        if !nets.is_empty() {
            rules.push_str(&format!(
                "\t\tiifname \"{device}\" {family} daddr {{ {} }} masquerade\n",
                nets.join(", ")
            ));
        }
    }
    let mut dnat = String::new();
    for addr in overlay {
        let family = if addr.is_ipv6() { "ip6" } else { "ip" };
        for f in forwards.iter().filter(|f| f.to.is_ipv6() == addr.is_ipv6()) {
            for proto in ["tcp", "udp"] {
                dnat.push_str(&format!(
                    "\t\tiifname \"{device}\" {family} daddr {addr} {proto} dport {} dnat {family} to {}\n",
                    f.port, f.to
                ));
            }
        }
    }
    if !dnat.is_empty() {
        rules.push_str(&format!(
            "\t\tiifname \"{device}\" ct status dnat masquerade\n"
        ));
    }
    let prerouting = if dnat.is_empty() {
        String::new()
    } else {
        format!(
            "\tchain prerouting {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             {dnat}\
             \t}}\n"
        )
    };
    // Declaring the table first makes the delete succeed whether or not an
    // earlier run left it behind.
    format!(
        "table inet {table} {{}}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
         {prerouting}\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         {rules}\
         \t}}\n\
         }}\n"
    )
}

impl SiteTable {
    /// The table of `device`, not loaded yet.
    pub fn new(device: &str) -> Self {
        Self {
            device: device.to_string(),
            lans: Vec::new(),
            overlay: Vec::new(),
            forwards: Vec::new(),
            installed: false,
        }
    }

    /// Rewrites the source of tunnel traffic entering `lans` from now on.
    pub fn set_lans(&mut self, lans: &[IpNet]) -> anyhow::Result<()> {
        self.lans = lans.to_vec();
        self.load().context(
            "cannot install the source rewrite for the LANs (is nftables installed? \
             set lan_source = \"original\" if the LANs route the overlay back to this host)",
        )
    }

    /// The site's own overlay addresses, which forwarded ports apply to.
    pub fn set_overlay(&mut self, overlay: &[IpAddr]) -> anyhow::Result<()> {
        if self.overlay == overlay {
            return Ok(());
        }
        self.overlay = overlay.to_vec();
        self.load()
            .context("cannot install the forwarding of services")
    }

    /// Forwards these ports from now on.
    pub fn set_forwards(&mut self, forwards: &[Forwarded]) -> anyhow::Result<()> {
        if self.forwards == forwards {
            return Ok(());
        }
        self.forwards = forwards.to_vec();
        self.load()
            .context("cannot install the forwarding of services")
    }

    fn load(&mut self) -> anyhow::Result<()> {
        let empty = self.lans.is_empty() && (self.forwards.is_empty() || self.overlay.is_empty());
        if empty && !self.installed {
            return Ok(());
        }
        nft(&table_script(
            &self.device,
            &self.lans,
            &self.overlay,
            &self.forwards,
        ))?;
        self.installed = true;
        Ok(())
    }
}

impl Drop for SiteTable {
    fn drop(&mut self) {
        if !self.installed {
            return;
        }
        let table = table_name(&self.device);
        if let Err(e) = nft(&format!("delete table inet {table}\n")) {
            tracing::warn!("cannot remove the nftables table {table}: {e:#}");
        }
    }
}

/// Runs `nft -f -` with `script`.
fn nft(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The sysctl that lets the kernel forward between the device and LANs of
/// `family` (4 or 6).
fn forwarding_path(v6: bool) -> &'static str {
    if v6 {
        "/proc/sys/net/ipv6/conf/all/forwarding"
    } else {
        "/proc/sys/net/ipv4/ip_forward"
    }
}

/// Whether the kernel forwards packets of the family of `lan`.
pub fn forwarding_enabled(lan: &IpNet) -> Option<bool> {
    let v6 = matches!(lan, IpNet::V6(_));
    std::fs::read_to_string(forwarding_path(v6))
        .ok()
        .map(|v| v.trim() == "1")
}

/// Turns on IPv4 forwarding for IPv4 LANs, or says how to. IPv6
/// forwarding is only checked: turning it on makes the host stop accepting
/// router advertisements on its uplink (unless `accept_ra = 2` there), which
/// is the administrator's decision, so the error says what to set.
pub fn enable_forwarding(lans: &[IpNet]) -> anyhow::Result<()> {
    for lan in lans {
        enable_forwarding_to(matches!(lan, IpNet::V6(_)), &format!("the LAN {lan}"))?;
    }
    Ok(())
}

/// [`enable_forwarding`] for one address family (`v6`), so that `what`
/// (in plain words, for the error) can be reached.
pub fn enable_forwarding_to(v6: bool, what: &str) -> anyhow::Result<()> {
    let on = std::fs::read_to_string(forwarding_path(v6))
        .ok()
        .is_some_and(|v| v.trim() == "1");
    if on {
        return Ok(());
    }
    if v6 {
        bail!(
            "IPv6 forwarding is off, so {what} cannot be reached: run \
             `sysctl -w net.ipv6.conf.all.forwarding=1` (and set accept_ra=2 on the \
             uplink if it takes its address from router advertisements)"
        );
    }
    let key = "net.ipv4.ip_forward";
    std::fs::write(forwarding_path(false), "1").with_context(|| {
        format!(
            "IPv4 forwarding is off and cannot be turned on, so {what} \
             cannot be reached: run `sysctl -w {key}=1` (and make it permanent in \
             /etc/sysctl.d/)"
        )
    })?;
    tracing::info!("turned on IPv4 forwarding ({key}) for {what}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::netmap::Mapping;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn the_script_replaces_one_table_of_its_own() {
        let script = rewrite_script("tether-0", &[net("192.168.1.0/24"), net("fd00:1::/64")]);
        assert_eq!(
            script,
            "table inet tether_site_tether_0 {}\n\
             delete table inet tether_site_tether_0\n\
             table inet tether_site_tether_0 {\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tiifname \"tether-0\" ip daddr { 192.168.1.0/24 } masquerade\n\
             \t\tiifname \"tether-0\" ip6 daddr { fd00:1::/64 } masquerade\n\
             \t}\n\
             }\n"
        );
    }

    #[test]
    fn forwarded_ports_of_the_overlay_addresses_go_to_their_targets() {
        let overlay: Vec<IpAddr> = vec!["100.64.0.7".parse().unwrap(), "fd74::7".parse().unwrap()];
        let forwards = [
            Forwarded {
                port: 104,
                to: "10.96.0.10:11112".parse().unwrap(),
            },
            Forwarded {
                port: 104,
                to: "[fd00::10]:11112".parse().unwrap(),
            },
        ];
        let script = table_script("tether0", &[net("192.168.1.0/24")], &overlay, &forwards);
        assert_eq!(
            script,
            "table inet tether_site_tether0 {}\n\
             delete table inet tether_site_tether0\n\
             table inet tether_site_tether0 {\n\
             \tchain prerouting {\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tiifname \"tether0\" ip daddr 100.64.0.7 tcp dport 104 dnat ip to 10.96.0.10:11112\n\
             \t\tiifname \"tether0\" ip daddr 100.64.0.7 udp dport 104 dnat ip to 10.96.0.10:11112\n\
             \t\tiifname \"tether0\" ip6 daddr fd74::7 tcp dport 104 dnat ip6 to [fd00::10]:11112\n\
             \t\tiifname \"tether0\" ip6 daddr fd74::7 udp dport 104 dnat ip6 to [fd00::10]:11112\n\
             \t}\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tiifname \"tether0\" ip daddr { 192.168.1.0/24 } masquerade\n\
             \t\tiifname \"tether0\" ct status dnat masquerade\n\
             \t}\n\
             }\n"
        );
        // Without an overlay address yet, nothing is forwarded.
        assert_eq!(
            table_script("tether0", &[net("192.168.1.0/24")], &[], &forwards),
            rewrite_script("tether0", &[net("192.168.1.0/24")])
        );
    }

    #[test]
    fn refused_packets_are_dropped_and_counted_by_reason() {
        let path = LanPath::default();
        let map = LanMap::new(vec![
            Mapping::new(net("192.168.1.0/24"), net("100.64.9.0/24")).unwrap(),
        ])
        .unwrap();
        path.set(map.clone());
        path.set_assigned(&[net("100.64.1.2/32"), net("100.64.9.0/24")]);
        assert_eq!(path.current().map(), &map);
        let counts = |not_for_site, malformed| {
            vec![
                ("not_for_site", not_for_site),
                ("lan_map_malformed", malformed),
                ("lan_map_protocol", 0),
            ]
        };
        // An IPv4 header cut short is malformed.
        let mut cut = vec![0x45, 0, 0, 40, 0, 0];
        assert!(!path.to_device(&path.current(), &mut cut));
        assert_eq!(path.drops(), counts(0, 1));
        // From the tunnel: the site's own address and a mapped one go to
        // the device (the latter translated); a LAN address outside the
        // mapping, or another overlay address, does not.
        let to = |dst: [u8; 4]| udp([100, 64, 0, 9], dst);
        let mut own = to([100, 64, 1, 2]);
        assert!(path.to_device(&path.current(), &mut own));
        assert!(path.admits(&path.current(), &own));
        let mut mapped = to([100, 64, 9, 20]);
        assert!(path.to_device(&path.current(), &mut mapped));
        assert_eq!(mapped[16..20], [192, 168, 1, 20]);
        for dst in [[192, 168, 1, 40], [192, 168, 2, 40], [100, 64, 1, 3]] {
            assert!(!path.to_device(&path.current(), &mut to(dst)), "{dst:?}");
        }
        assert_eq!(path.drops(), counts(3, 1));
        // Without LANs only the site's own addresses are taken.
        path.set(LanMap::default());
        assert!(path.admits(&path.current(), &own));
        assert!(!path.admits(&path.current(), &to([100, 64, 9, 20])));
        assert_eq!(path.drops(), counts(4, 1));
        // An empty map lets everything from the device through untouched.
        let mut any = vec![1, 2, 3];
        assert!(path.from_lan(&path.current(), &mut any));
        assert_eq!(any, [1, 2, 3]);
    }

    /// A UDP packet from `src` to `dst` (checksums left at zero: none).
    fn udp(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[0, 53, 0, 53, 0, 8, 0, 0]);
        p
    }
}
