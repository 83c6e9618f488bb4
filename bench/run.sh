#!/usr/bin/env bash
# The tunnel benchmark: tether next to the raw routed path, boringtun-cli and
# wireguard-go on the hospital topology, in one run. Needs root.
#
#   bench/run.sh [--duration SECONDS] [--sites N]
#   bench/run.sh --lossy [--only h3,h2,raw,boringtun,wggo]
#   bench/run.sh --drops ROUNDS [--duration SECONDS]
#   bench/run.sh --storm SITES [--rounds N]
#   bench/run.sh --lan ROUNDS [--duration SECONDS]
#   bench/run.sh --idle 10000,50000 [--idle-cpu SECONDS] [--per-loadgen N]
#
# --lossy measures the lossy and long paths instead (1 % loss at 50 ms RTT,
# 5 % at 200 ms, applied on the WAN link by tether-wan since the kernel has
# no netem), one iperf3 stream with BBR and one with Cubic inside.
# --drops measures where packets are lost inside tether under load: 1 and 4
# iperf3 streams each way over HTTP/3, with the tunnelled TCP's retransmits
# and every drop counter on the way (broker drop reasons, the tunnel
# devices, UDP buffers, the kernel's backlog).
# --storm measures a reconnect storm: SITES idle sites (tether-loadgen),
# the broker killed with SIGKILL and restarted N times (default 5); per
# round, when every site was back and whether any changed its address.
# --lan measures a host on the hospital LAN through the site's LAN mapping
# next to the site's own address, alternating the two ROUNDS times.
# --idle measures idle sites on one broker: sites enrolled for real and
# connected by tether-loadgen (N per process, each its own QUIC endpoint)
# in steps up to each count; after each step the broker's memory (VmRSS,
# KiB per site), open files, the connect rate, and the CPU of the broker,
# the load generators and the whole machine while every site is idle.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v iperf3 wg wireguard-go ethtool >/dev/null || {
  echo "needs iperf3, wireguard-tools, wireguard-go and ethtool (apt-get install iperf3 wireguard-tools wireguard-go ethtool)" >&2
  exit 1
}
command -v boringtun-cli >/dev/null || [ -x "$HOME/.cargo/bin/boringtun-cli" ] || cargo install boringtun-cli --locked
cargo build --release --workspace --bins --locked
exec target/release/tether-bench "$@"
