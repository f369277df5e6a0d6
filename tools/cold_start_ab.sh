#!/usr/bin/env bash
# Issue 29's cold start A/B: `meshserve serve` (llama-3.1-8b, dummy weights) from an EMPTY Triton cache, once per
# MESHSERVE_PARALLEL_COMPILE mode of MODES (default "1 procs 1 procs": threads, processes, interleaved), each
# start timed to /health + /v1/models (polled every 0.1 s) with the server's own start-up timeline line.
# Usage (device, repo root, carry .whl and .whl-tf): bash tools/cold_start_ab.sh
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"
model=${MODEL:-llama-3.1-8b}
[ -d /tmp/tok ] || python3 -m meshserve.cli bench tokenizer /tmp/tok > /dev/null || exit 1
i=0
for mode in ${MODES:-1 procs 1 procs}; do
  i=$((i + 1)); log="$OUT/cold_${i}_$mode.log"
  t0=$(date +%s.%N)
  TRITON_CACHE_DIR=$(mktemp -d) MESHSERVE_PARALLEL_COMPILE=$mode python3 -m meshserve.cli serve "$model" \
    --load-format dummy --tokenizer /tmp/tok --max-model-len 4096 --port 8000 --disable-access-log > "$log" 2>&1 &
  pid=$!
  for _ in $(seq 1 1200); do
    curl -sf localhost:8000/health > /dev/null && curl -sf localhost:8000/v1/models > /dev/null && break
    kill -0 $pid 2> /dev/null || { echo "$mode: server died"; tail -5 "$log"; break; }
    sleep 0.1
  done
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" -v m="$mode" 'BEGIN { printf "PARALLEL_COMPILE=%s: ready after %.1f s (cold)\n", m, b - a }'
  sleep 0.5; grep -m1 "start-up, seconds since launch" "$log" | sed 's/^.*start-up/  start-up/'
  kill -TERM $pid; wait $pid
done
