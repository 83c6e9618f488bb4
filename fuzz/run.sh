#!/usr/bin/env bash
# Runs tether's fuzz targets (cargo-fuzz, libFuzzer) one after another, each
# for DURATION seconds, starting from the committed seed corpus, and prints a
# table of CPU time, executions and crashes per target. Exits 1 when a
# target crashed (the input that crashed is in fuzz/artifacts/TARGET/), and
# 130 when it was stopped with SIGINT (Ctrl-C): the target being fuzzed then
# counts as interrupted, not crashed, the table holds what ran, and the
# targets after it are not started.
#
#   fuzz/run.sh [DURATION] [TARGET...]
#
# DURATION defaults to 20; use 3600 for an hour per target. By default it is
# wall-clock time; with BUDGET=cpu it is the fuzzer's own CPU time instead
# (the target runs in slices of at most 10 minutes until its CPU time adds up
# to DURATION), for a machine shared with other work, where a fuzzer at low
# priority gets less than a core. NO_BUILD=1 runs the targets as last
# built, without building every target first. SANITIZER=none
# builds without AddressSanitizer (CI does, to keep its run short). Inputs that
# find new coverage go to fuzz/work/TARGET/ (not committed); add the useful
# ones to fuzz/corpus/ with `cargo fuzz cmin`. Needs cargo-fuzz (installed
# here with `cargo install cargo-fuzz --locked` when missing); it runs on
# the stable toolchain with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")"

duration=${1:-20}
shift || true
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi

# SANITIZER: address (default) or none (faster to build; panics, overflow
# and debug assertions are still caught).
sanitizer=${SANITIZER:-address}
if [ "${NO_BUILD:-0}" = 1 ]; then
  # NO_BUILD=1: run the targets as last built (e.g. built one at a time
  # with `cargo fuzz build --sanitizer address TARGET`).
  echo "== running the fuzz targets as last built"
else
  echo "== building ${#targets[@]} fuzz targets (release, debug assertions, sanitizer: $sanitizer)"
  cargo fuzz build --sanitizer "$sanitizer"
fi

host=$(rustc -vV | sed -n 's/^host: //p')
report=$(mktemp)
trap 'rm -f "$report"' EXIT
failed=()
stopped=0
for target in "${targets[@]}"; do
  mkdir -p "work/$target" "corpus/$target"
  log="work/$target.log"
  echo "== $target (${duration}s)"
  # -timeout: one input may take at most 10 s; -rss_limit_mb: 2 GB.
  start=$(date +%s)
  status=0
  mkdir -p "artifacts/$target"
  cpu_total=0
  execs_total=0
  slices=0
  while :; do
    if [ "${BUDGET:-wall}" = cpu ]; then
      left=$((duration - cpu_total))
      slice=$((left < 600 ? left : 600))
    else
      slice=$duration
    fi
    # The built binary itself (what `cargo fuzz run` starts), so the CPU
    # time is the fuzzer's alone.
    /usr/bin/time -f "%U %S" -o "work/$target.time" \
      "target/$host/release/$target" \
      -artifact_prefix="artifacts/$target/" -max_total_time="$slice" \
      -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      "work/$target" "corpus/$target" >"$log" 2>&1 || status=$?
    slices=$((slices + 1))
    # The last line holds the times (a line before it may report the status).
    read -r user sys < <(tail -1 "work/$target.time") || { user=0; sys=0; }
    cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.0f", u + s }')
    execs=$(awk '/stat::number_of_executed_units/ { n = $NF } END { print n + 0 }' "$log")
    cpu_total=$((cpu_total + cpu))
    execs_total=$((execs_total + execs))
    # Progress of a long run, so that what was done is on record even
    # when the run is stopped before its budget is spent.
    echo "   slice $((slices)): ${cpu} CPU s, ${execs} executions (so far ${cpu_total} CPU s, ${execs_total} executions, status ${status})"
    if [ "$status" -ne 0 ] || [ "${BUDGET:-wall}" != cpu ] || [ "$cpu_total" -ge "$duration" ]; then
      break
    fi
  done
  wall=$(($(date +%s) - start))
  cpu=$cpu_total
  execs=$execs_total
  cov=$(awk '{ for (i = 1; i < NF; i++) if ($i == "cov:") c = $(i + 1) } END { print c }' "$log")
  crashes=0
  if [ "$status" -ne 0 ] && grep -q "libFuzzer: run interrupted" "$log"; then
    # SIGINT reached the fuzzer (libFuzzer's status 72): stopped, no crash.
    stopped=1
    echo "   interrupted: stopped with SIGINT, no crash" >&2
  elif [ "$status" -ne 0 ]; then
    crashes=1
    failed+=("$target")
    echo "   CRASH: see fuzz/$log and fuzz/artifacts/$target/" >&2
    grep -E "panicked at|ERROR: AddressSanitizer|ERROR: libFuzzer|SUMMARY" "$log" | head -5 >&2 || true
  fi
  printf '| %s | %s | %s | %s | %s | %s |\n' "$target" "$wall" "$cpu" "${execs:-?}" "${cov:-?}" "$crashes" >>"$report"
  if [ "$stopped" = 1 ]; then
    break
  fi
done

echo
echo "| target | wall s | CPU s | executions | coverage (edges) | crashes |"
echo "|---|---:|---:|---:|---:|---:|"
cat "$report"
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashed: ${failed[*]}" >&2
  exit 1
fi
if [ "$stopped" = 1 ]; then
  echo "stopped with SIGINT before the end" >&2
  exit 130
fi
