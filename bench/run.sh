#!/usr/bin/env bash
# The tunnel benchmark: tether next to the raw routed path, boringtun-cli,
# wireguard-go and quincy (tls and noise modes) on the hospital topology, in
# one run. Needs root.
#
#   bench/run.sh [--duration SECONDS] [--sites N]
#   bench/run.sh --lossy [--only h3,h2,raw,boringtun,wggo,quincy-tls,quincy-noise]
#                        [--lossy-path B,C] [--inner bbr,cubic] [--wg-mtu BYTES]
#   bench/run.sh --drops ROUNDS [--drops-via-gateway] [--duration SECONDS]
#   bench/run.sh --storm SITES [--rounds N] [--keepalive S]
#   bench/run.sh --agents N [--rounds R] [--gap S] [--keepalive S]
#   bench/run.sh --lan ROUNDS [--duration SECONDS]
#   bench/run.sh --busy SITES [--duration SECONDS] [--busy-rate PPS] [--busy-size BYTES]
#   bench/run.sh --idle 10000,50000 [--idle-cpu SECONDS] [--per-loadgen N]
#   bench/run.sh --ha [KILLS] [--ha-sites N] [--ha-quiet SECONDS] [--duration SECONDS]
#   bench/run.sh --console SITES [--console-enrolled K] [--console-rounds R]
#
# --lossy measures the lossy and long paths instead (1 % loss at 50 ms RTT,
# 5 % at 200 ms, applied on the WAN link by tether-wan since the kernel has
# no netem), one iperf3 stream with BBR and one with Cubic inside; for
# tether over HTTP/3 also the broker's side of the QUIC path during each
# stream (outer congestion window, datagrams queued in front of it, loss),
# sampled from the admin API. --lossy-path and --inner pick cells; --wg-mtu
# sets the WireGuard baselines' MTU (default 1420) to compare at the packet
# size of tether's device, which the run prints.
# --drops measures where packets are lost inside tether under load: 1 and 4
# iperf3 streams each way over HTTP/3, with the tunnelled TCP's retransmits
# and every drop counter on the way (broker drop reasons, the tunnel
# devices, UDP buffers, the kernel's backlog) and the end hosts' TCP
# counters of loss and reordering; --drops-via-gateway runs it from the
# backend of a cloud gateway (WireGuard, then HTTP/3).
# --storm measures a reconnect storm: SITES idle sites (tether-loadgen),
# the broker killed with SIGKILL and restarted N times (default 5); per
# round, when every site was back and whether any changed its address.
# --agents runs N real agents (`tether up`, each in its own namespace on
# the hospital LAN behind the firewall's NAT, enrolled with `tether enroll`,
# pinged 5 times a second each from the backend) through R broker kill -9
# and restarts, GAP seconds after all are back; per round, when every agent
# answered again, how each noticed, and whether any address moved or was
# routed to two sites. Namespaces and processes are removed on every exit.
# --lan measures a host on the hospital LAN through the site's LAN mapping
# next to the site's own address, alternating the two ROUNDS times.
# --busy measures many busy sites: SITES load-generator sites (tether-loadgen
# busy, one QUIC endpoint) send UDP through the broker to a sink on the
# backend, then the backend sends to them, each direction with one site alone
# and with all SITES at once (SECONDS per phase): aggregate goodput, per-site
# min/median/max, Jain's fairness index, CPU seconds per GB and every drop
# counter that moved. Offered load: as fast as the senders go, or PPS packets
# per second over all sending sites.
# --idle measures idle sites on one broker: sites enrolled for real and
# connected by tether-loadgen (N per process, each its own QUIC endpoint)
# in steps up to each count; after each step the broker's memory (VmRSS,
# KiB per site), open files, the connect rate, and the CPU of the broker,
# the load generators and the whole machine while every site is idle.
# --ha measures several brokers on a three-member etcd cluster (etcd from
# /usr/bin/etcd, the real brokers and agents, each in its own namespace):
# iperf3 (1 stream each way, SECONDS each) between two sites on two brokers,
# relayed over the broker-to-broker link, next to the same sites on one
# broker; the failover gap over KILLS (default 20) SIGKILLs of the broker
# holding a site that the other site probes every 10 ms and that a backend
# behind a cloud gateway (tether-gateway, registered on the three brokers)
# pings every 10 ms (each killed broker is started again before the next
# kill; per round both gaps, the requests lost and whether the site kept
# its address; p50/p99/max of each);
# etcd writes per second with N (default 1000) idle tether-loadgen sites
# connected, over a quiet interval (the revision, etcd's own write counters
# and every key written); and the time for those sites to be back on the
# other two brokers after their broker is killed, with their addresses.
# --console measures the fleet console with SITES sites registered at one
# broker (a token each), the first K (default 1000) enrolled and connected
# by tether-loadgen: the admin API requests the console makes (curl in the
# broker's namespace: time to first byte, total, bytes) and the pages in
# headless Chromium (bench/console_load.py, Playwright and Debian's
# chromium): first page load to rendered rows, a search, the last page, a
# site's page, the route table.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v iperf3 wg wireguard-go ethtool >/dev/null || {
  echo "needs iperf3, wireguard-tools, wireguard-go and ethtool (apt-get install iperf3 wireguard-tools wireguard-go ethtool)" >&2
  exit 1
}
command -v boringtun-cli >/dev/null || [ -x "$HOME/.cargo/bin/boringtun-cli" ] || cargo install boringtun-cli --locked
# quincy (a QUIC VPN on quinn, AGPL): an external peer, run as its own
# binaries from ~/.cargo/bin; the bench skips it if they are missing.
for q in quincy-client quincy-server quincy-identity; do
  command -v "$q" >/dev/null || [ -x "$HOME/.cargo/bin/$q" ] || {
    cargo install --locked --version 3.1.1 quincy-client quincy-server quincy-identity ||
      echo "could not install quincy: the bench will skip it" >&2
    break
  }
done
cargo build --release --workspace --bins --locked
exec target/release/tether-bench "$@"
