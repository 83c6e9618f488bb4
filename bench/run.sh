#!/usr/bin/env bash
# The tunnel benchmark: tether next to the raw routed path, boringtun-cli and
# wireguard-go on the hospital topology, in one run. Needs root.
#
#   bench/run.sh [--duration SECONDS] [--sites N]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v iperf3 wg wireguard-go >/dev/null || {
  echo "needs iperf3, wireguard-tools and wireguard-go (apt-get install iperf3 wireguard-tools wireguard-go)" >&2
  exit 1
}
command -v boringtun-cli >/dev/null || [ -x "$HOME/.cargo/bin/boringtun-cli" ] || cargo install boringtun-cli --locked
cargo build --release --workspace --bins --locked
exec target/release/tether-bench "$@"
