#!/usr/bin/env bash
# Start-up probe (issue 29): `meshserve serve` started WARM times with the Triton cache kept, once with an empty
# TRITON_CACHE_DIR (cold), and once with --api-server-count 4 (warm); for each, the time until /health and
# /v1/models answer (polled every 0.1 s) and the server's own start-up timeline line (every phase of every
# process, seconds since the launch). Then one offline LLM(...) start (its timeline line).
# Usage (device, repo root):  bash tools/start_probe.sh            (llama-3.1-8b, dummy weights, /tmp/tok)
# On a CPU: MODEL=/path/to/tiny SERVE_FLAGS="" OFFLINE=0 bash tools/start_probe.sh
# Env: MODEL (default llama-3.1-8b), SERVE_FLAGS (default: dummy weights, /tmp/tok, max-model-len 4096),
#      WARM (warm starts, default 3), PORT (8000), OFFLINE (1: also time LLM(...)), OUT (logs; /tmp/out)
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"
model=${MODEL:-llama-3.1-8b}
flags=${SERVE_FLAGS---load-format dummy --tokenizer /tmp/tok --max-model-len 4096}
port=${PORT:-8000}
warm=${WARM:-3}
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name --format=csv,noheader
case "$flags" in *"--tokenizer /tmp/tok"*) [ -d /tmp/tok ] || python3 -m meshserve.cli bench tokenizer /tmp/tok > /dev/null || exit 1;; esac

start() {  # start TAG [extra serve flags]: one start to ready, its timeline, then a clean stop
  local tag=$1; shift
  local log="$OUT/start_$tag.log"
  local t0; t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  python3 -m meshserve.cli serve "$model" $flags --port "$port" --disable-access-log "$@" > "$log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 3000); do
    curl -sf "localhost:$port/health" > /dev/null && curl -sf "localhost:$port/v1/models" > /dev/null && break
    kill -0 $pid 2> /dev/null || { echo "$tag: server died"; tail -20 "$log"; return 1; }
    sleep 0.1
  done
  local t1; t1=$(date +%s.%N)
  for _ in $(seq 1 600); do  # with several API processes the line is logged once the last one listens
    grep -q "start-up, seconds since launch" "$log" && break
    sleep 0.1
  done
  awk -v a="$t0" -v b="$t1" -v tag="$tag" 'BEGIN { printf "%s: ready after %.1f s (polled)\n", tag, b - a }'
  grep -m1 "start-up, seconds since launch" "$log" | sed 's/^.*start-up/  start-up/; s/ | /\n    | /g'
  curl -s "localhost:$port/metrics" | grep -E "^meshserve:startup_seconds"
  kill -TERM $pid; wait $pid
}

export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
start warm0 || exit 1  # fills the Triton and shapes caches if this machine is fresh
for i in $(seq 1 "$warm"); do start "warm$i" || exit 1; done
start api4 --api-server-count 4 || exit 1
TRITON_CACHE_DIR=$(mktemp -d) start cold_triton || exit 1
if [ "${OFFLINE:-1}" = 1 ]; then
  # shellcheck disable=SC2086
  python3 - "$model" $flags << 'PY' 2>&1 | grep -E "start-up|Error" | sed 's/^.*start-up/offline LLM(): start-up/; s/ | /\n    | /g'
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("meshserve").setLevel(logging.INFO)
from meshserve import LLM
args = sys.argv[2:]
kw = {a.lstrip("-").replace("-", "_"): b for a, b in zip(args[::2], args[1::2])}
if "max_model_len" in kw:
    kw["max_model_len"] = int(kw["max_model_len"])
LLM(sys.argv[1], **kw).shutdown()
PY
fi
