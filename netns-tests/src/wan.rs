//! An impaired WAN link between the hospital firewall and the internet.
//!
//! The kernel of these machines has no `netem` qdisc, so loss, delay,
//! reordering, duplication and outages are built into the topology:
//! `tether-wan` (bench/src/wan.rs) runs in a namespace of its own that
//! splits the veth between the firewall (`wan`) and the internet
//! (`hospital`) and forwards every Ethernet frame between the two ends.
//!
//! ```text
//! fw ─ wan(veth) ═ wan-a [impaired: tether-wan] wan-b ═ (veth)hospital ─ wan
//! ```

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::topology::{Topology, read};
use crate::{NetNs, Proc, binary, wait_for};

/// What the link does to each frame, per direction.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Frames dropped at random, in percent.
    pub loss_percent: f64,
    /// Delay of every frame (half the round trip).
    pub one_way: Duration,
    /// Frames held 5 ms longer than the others, in percent.
    pub reorder_percent: f64,
    /// Frames sent twice, in percent.
    pub duplicate_percent: f64,
}

/// The link's counters, both directions added up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames that arrived at either end.
    pub received: u64,
    /// Frames dropped at random.
    pub dropped: u64,
    /// Frames dropped because the delay line was full.
    pub overflow: u64,
    /// Frames larger than the MTU (offloads not off).
    pub oversize: u64,
    /// Frames held back to be overtaken.
    pub reordered: u64,
    /// Frames sent twice.
    pub duplicated: u64,
    /// Frames dropped while the link was down.
    pub blackholed: u64,
}

/// The impaired link and its forwarder.
pub struct ImpairedWan {
    ns: NetNs,
    proc: Option<Proc>,
    stats: PathBuf,
}

impl ImpairedWan {
    /// Splits the veth between the firewall (`wan`) and the internet
    /// (`hospital`) and puts the forwarder's namespace in between, with
    /// segmentation and checksum offloads off on both pairs so every frame
    /// is one packet. The link forwards nothing until [`Self::set`].
    pub fn insert(topo: &Topology) -> io::Result<Self> {
        let ns = NetNs::new("impaired")?;
        topo.fw.run("ip", &["link", "del", "wan"])?;
        for (peer, ifname, end, addr) in [
            (&topo.fw, "wan", "wan-a", "198.51.100.2/30"),
            (&topo.wan, "hospital", "wan-b", "198.51.100.1/30"),
        ] {
            peer.run(
                "ip",
                &[
                    "link",
                    "add",
                    ifname,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    end,
                    "netns",
                    ns.name(),
                ],
            )?;
            peer.run("ip", &["addr", "add", addr, "dev", ifname])?;
            for (n, i) in [(peer, ifname), (&ns, end)] {
                n.run(
                    "ethtool",
                    &[
                        "-K", i, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
                    ],
                )?;
                n.run("ip", &["link", "set", "dev", i, "up"])?;
            }
        }
        ns.run("sysctl", &["-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])?;
        // The firewall's default route went with its old link.
        topo.fw
            .run("ip", &["route", "add", "default", "via", "198.51.100.1"])?;
        Ok(Self {
            ns,
            proc: None,
            stats: topo.path("wan-stats.json"),
        })
    }

    /// (Re)starts the forwarder with `faults`; the loss pattern follows
    /// `seed`. Frames in flight at the restart are lost.
    pub fn set(&mut self, faults: Faults, seed: u64) -> io::Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.signal(Signal::SIGTERM);
            p.wait_exit(Duration::from_secs(5));
        }
        let _ = std::fs::remove_file(&self.stats);
        let delay = format!("{}ms", faults.one_way.as_millis());
        let args = [
            "--a".to_string(),
            "wan-a".into(),
            "--b".into(),
            "wan-b".into(),
            "--loss".into(),
            faults.loss_percent.to_string(),
            "--delay".into(),
            delay,
            "--reorder".into(),
            faults.reorder_percent.to_string(),
            "--duplicate".into(),
            faults.duplicate_percent.to_string(),
            "--seed".into(),
            seed.to_string(),
            "--stats".into(),
            self.stats.display().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.stats.with_extension("log");
        self.proc = Some(self.ns.spawn(
            &binary("tether-wan").display().to_string(),
            &args,
            Some(log.clone()),
        )?);
        if !wait_for(Duration::from_secs(10), || self.stats.exists()) {
            return Err(io::Error::other(format!(
                "tether-wan did not start:\n{}",
                read(&log)
            )));
        }
        Ok(())
    }

    /// Takes the link down (`false`: every frame is dropped) or brings it
    /// back, and waits until the forwarder reports the change.
    pub fn set_up(&self, up: bool) -> io::Result<()> {
        let proc = self
            .proc
            .as_ref()
            .ok_or_else(|| io::Error::other("the forwarder is not running"))?;
        proc.signal(if up { Signal::SIGUSR2 } else { Signal::SIGUSR1 });
        let applied = wait_for(Duration::from_secs(5), || {
            self.json()["down"].as_bool() == Some(!up)
        });
        if applied {
            Ok(())
        } else {
            Err(io::Error::other("the forwarder did not apply the change"))
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&read(&self.stats)).unwrap_or_default()
    }

    /// The counters of the running forwarder since its start.
    pub fn counters(&self) -> Counters {
        let json = self.json();
        let mut c = Counters::default();
        for dir in ["wan-a->wan-b", "wan-b->wan-a"] {
            let get = |k: &str| json[dir][k].as_u64().unwrap_or(0);
            c.received += get("received");
            c.dropped += get("dropped");
            c.overflow += get("overflow");
            c.oversize += get("oversize");
            c.reordered += get("reordered");
            c.duplicated += get("duplicated");
            c.blackholed += get("blackholed");
        }
        c
    }
}
