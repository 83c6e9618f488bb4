//! `tether firewall-rule`: the one rule hospital IT must allow, in the
//! forms their firewalls take.

use ipnet::IpNet;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Plain words for a change request.
    Text,
    /// A complete nftables table (`| nft -f -`) for a firewall dedicated
    /// to the site: tether's traffic out, replies back, nothing else.
    Nftables,
    /// Only the two nftables rules, for an existing forward chain.
    NftablesRules,
    /// iptables / ip6tables commands.
    Iptables,
}

/// The rule for `cidr` in `format`.
pub fn rule(cidr: IpNet, format: Format) -> String {
    let v6 = matches!(cidr, IpNet::V6(_));
    match format {
        Format::Text => format!(
            "Allow outbound connections from the tether site to {cidr} on TCP port 443 (HTTPS) and UDP port 443 (HTTP/3, QUIC).\n\
             Replies to these connections must be allowed back (stateful firewall). Nothing inbound is needed.\n\
             If only TCP 443 can be allowed, tether still works over HTTP/2, somewhat slower; if only an HTTP proxy may reach out, the proxy must allow CONNECT to {cidr} port 443.\n"
        ),
        Format::Nftables => {
            let family = if v6 { "ip6" } else { "ip" };
            format!(
                "# tether: a firewall dedicated to the site lets out only tether's\n\
                 # traffic to the brokers, and the replies back. Load it with\n\
                 #   tether firewall-rule --format nftables | nft -f -\n\
                 # On a firewall that filters other traffic too, add the two rules of\n\
                 # `--format nftables-rules` to its forward chain instead: an accept in\n\
                 # this table does not override a drop in another.\n\
                 table inet tether_egress {{\n\
                 \tchain forward {{\n\
                 \t\ttype filter hook forward priority filter; policy drop;\n\
                 \t\tct state established,related accept\n\
                 \t\t{family} daddr {cidr} tcp dport 443 accept\n\
                 \t\t{family} daddr {cidr} udp dport 443 accept\n\
                 \t}}\n\
                 }}\n"
            )
        }
        Format::NftablesRules => {
            let family = if v6 { "ip6" } else { "ip" };
            format!(
                "# tether: in the hospital firewall's forward (or output) chain\n\
                 {family} daddr {cidr} tcp dport 443 accept\n\
                 {family} daddr {cidr} udp dport 443 accept\n"
            )
        }
        Format::Iptables => {
            let cmd = if v6 { "ip6tables" } else { "iptables" };
            format!(
                "# tether: on the hospital firewall (use OUTPUT instead of FORWARD on the site host itself)\n\
                 {cmd} -A FORWARD -d {cidr} -p tcp --dport 443 -j ACCEPT\n\
                 {cmd} -A FORWARD -d {cidr} -p udp --dport 443 -j ACCEPT\n"
            )
        }
    }
}

/// Every format, one after the other, headed.
pub fn all(cidr: IpNet) -> String {
    format!(
        "== plain text ==\n{}\n== nftables ==\n{}\n== iptables ==\n{}",
        rule(cidr, Format::Text),
        rule(cidr, Format::Nftables),
        rule(cidr, Format::Iptables)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_the_cidr_and_both_protocols() {
        let cidr: IpNet = "203.0.113.0/24".parse().unwrap();
        let nft = rule(cidr, Format::NftablesRules);
        assert!(nft.contains("ip daddr 203.0.113.0/24 tcp dport 443 accept"));
        assert!(nft.contains("ip daddr 203.0.113.0/24 udp dport 443 accept"));
        let ipt = rule(cidr, Format::Iptables);
        assert!(ipt.contains("iptables -A FORWARD -d 203.0.113.0/24 -p udp --dport 443 -j ACCEPT"));
        let v6: IpNet = "2001:db8:443::/48".parse().unwrap();
        assert!(
            rule(v6, Format::NftablesRules).contains("ip6 daddr 2001:db8:443::/48 tcp dport 443")
        );
        assert!(rule(v6, Format::Iptables).contains("ip6tables -A FORWARD"));
        let text = all(cidr);
        assert!(text.contains("TCP port 443") && text.contains("UDP port 443"));
    }

    /// The default nftables output is a table `nft` loads as it is (checked
    /// by `nft -c`, which needs root and Debian's nftables; CI has both).
    #[test]
    fn the_nftables_table_loads() {
        use std::io::Write;
        let root = nix::unistd::geteuid().is_root();
        let nft = std::process::Command::new("nft").arg("--version").output();
        if !root || nft.is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run this as root with nftables installed"
            );
            println!("skipped: needs root and nft");
            return;
        }
        for cidr in ["203.0.113.0/24", "2001:db8:443::/48"] {
            let text = rule(cidr.parse().unwrap(), Format::Nftables);
            let mut child = std::process::Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
