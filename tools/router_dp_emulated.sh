#!/usr/bin/env bash
# Issue 28: W3 through the current router in front of DP=2, with the two replicas' devices emulated, on the GPU
# host's 16 cores (no GPU is used: the run stands in for nvidia-h200-x2, not lent since the tenth session, whose
# DP=2-through-the-router rows measured the router before httptools / uvloop).
#
# Each replica is the real server and the real EngineCore (scheduler, SLO admission and shedding, step-time model,
# step trace, runner) with the forward removed and an emulated device (`python -m meshserve.bench.frontend_server
# --real-core`, bench/real_core.py): a step lasts base + per token x new tokens + per context token x KV tokens,
# DEVICE's three numbers (default: the least-squares line of the 8B's W3 steps on an H200, 5,746 steps of
# benchmarks/results/h200_1206_s53/router_host/w3_direct/steps.jsonl.gz, mean error 3.6%), and the
# step-time model starts from the whole 8B's prior on an H200 (--prior-gpu). What is real: the router (one
# process, `meshserve router --workers 1`, least outstanding), both API processes, both cores' host work, the
# client. The simulator replays the run with the same device line as its step cost, so every difference is the
# simulator's model of the router, the routing, the API processes and the schedulers
# (`python -m meshserve.simulator.validation_dp_router table DIR`).
#
#   (1) W3 with targets at QPS_DIRECT (32) straight to replica A (the fixed latency's fit, as router_host_device.sh)
#   (2) W3 with targets at each QPS of QPS (64,96,128) through the router in front of replicas A and B (W3's prompts differ by
#       QPS: no point hits another's prefix cache)
# with every process's CPU each second (tools/proc_cpu.py) and each core's step trace.
#
# Usage (device, repo root, carry .whl and .whl-tf): bash tools/router_dp_emulated.sh    (~6 min)
# Env: QPS, QPS_DIRECT, CLIENT_PROCS (4), NUM_BLOCKS (55776: the 8B's KV blocks on an H200), ROUTER_WORKERS (1),
#   DEVICE ("4.205 19.99 0.0355": ms, us per token, us per context token), PRIOR_GPU (H200), BUDGET (480 s).
# DRY=1 (the CPU box): 40 prompts a point at QPS 4 (direct) and 4,8 (router), 4,000 blocks, no device_env.sh.
# Results: $OUT/router_dp.tgz (env.txt; direct/ and dp2_router/ with w3.json (w3_QPS.json merged), w3_QPS.txt, the
# servers' logs, steps_*.jsonl, proc_cpu_*.jsonl, metrics_PORT_QPS.txt: each replica's admission margin after each
# point) and $OUT/summary.txt.
set -u -o pipefail
. "$(dirname "${BASH_SOURCE[0]}")/serve_procs.sh"  # script_env, host_facts, kill_group, wait_ready
script_env /tmp/router_dp_dry
T0=$SECONDS
MS="python3 -m meshserve.cli"
MODEL=llama-3.1-8b
QPS=${QPS:-64,96,128}
QPS_DIRECT=${QPS_DIRECT:-32}
CLIENT_PROCS=${CLIENT_PROCS:-4}
NUM_BLOCKS=${NUM_BLOCKS:-55776}
ROUTER_WORKERS=${ROUTER_WORKERS:-1}
DEVICE=${DEVICE:-4.205 19.99 0.0355}
PRIOR_GPU=${PRIOR_GPU:-H200}
BUDGET=${BUDGET:-480}
W3_EXTRA="" REPLICA_LIMIT=120
if [ "${DRY:-0}" = 1 ]; then
  QPS=4,8 QPS_DIRECT=4 NUM_BLOCKS=4000 W3_EXTRA="--num-prompts 40" CLIENT_PROCS=1
fi
read -r BASE_MS US_TOKEN US_CONTEXT <<< "$DEVICE"
W=/tmp/router_dp_work
rm -rf "$W"; mkdir -p "$W/direct" "$W/dp2_router" "$OUT"
PORT_A=8001 PORT_B=8002 ROUTER_PORT=8000
say() { echo "[$(( SECONDS - T0 )) s] $*"; }
left() { echo $(( BUDGET - (SECONDS - T0) )); }

{
  host_facts
  echo "model $MODEL"
  echo "device_base_ms $BASE_MS"
  echo "device_us_per_token $US_TOKEN"
  echo "device_us_per_context_token $US_CONTEXT"
  echo "prior_gpu $PRIOR_GPU"
  echo "num_blocks $NUM_BLOCKS"
  echo "router_workers $ROUTER_WORKERS"
  echo "qps_direct $QPS_DIRECT"
  echo "qps_router $QPS"
  echo "dry ${DRY:-0}"
} > "$W/env.txt"
cat "$W/env.txt"

TOK=""
if [ "${DRY:-0}" != 1 ]; then  # the embedded model's GGUF is not on the device: the preset's generated tokenizer
  $MS bench tokenizer /tmp/tok --model "$MODEL" > /dev/null || exit 1
  TOK="--tokenizer /tmp/tok"
fi

PIDS="" ROUTER_PID="" LOGGERS=""
cleanup() {
  [ -n "$LOGGERS" ] && kill $LOGGERS 2> /dev/null
  kill_group "$ROUTER_PID"
  for p in $PIDS; do kill_group "$p"; done
  LOGGERS="" ROUTER_PID="" PIDS=""
}
trap cleanup EXIT
# start_replica NAME PORT DIR: one emulated replica (does not wait); its pid in REPLICA_PID
start_replica() {
  setsid python3 -m meshserve.bench.frontend_server --real-core "$MODEL" --prior-gpu "$PRIOR_GPU" $TOK \
    --host 127.0.0.1 --port "$2" --max-model-len 4096 --slo-ttft-ms 1000 --slo-tpot-ms 50 \
    --num-blocks "$NUM_BLOCKS" --device-base-ms "$BASE_MS" --device-us-per-token "$US_TOKEN" \
    --device-us-per-context-token "$US_CONTEXT" --step-trace "$3/steps_$1.jsonl" > "$3/serve_$1.log" 2>&1 &
  REPLICA_PID=$!
  PIDS="$PIDS $REPLICA_PID"
}
# w3 DIR URL QPS PORTS NAME=PID...: W3 with targets at each QPS of the list through URL, one `bench serve` a point
# (w3_QPS.json, merged into w3.json), each named process's CPU each second, and after each point the admission
# margin of the replicas on PORTS (a comma list; metrics_PORT_QPS.txt: meshserve:admission_margin and its error)
w3() {
  local d=$1 url=$2 qps=$3 ports=$4 limit q port
  shift 4
  for named in "$@"; do
    python3 tools/proc_cpu.py log "${named#*=}" 1 > "$d/proc_cpu_${named%%=*}.jsonl" 2> /dev/null &
    LOGGERS="$LOGGERS $!"
  done
  for q in ${qps//,/ }; do
    limit=60; (( limit > $(left) )) && limit=$(left)
    if (( limit < 40 )); then say "W3 $d QPS $q: skipped ($(left) s of the budget left)"; continue; fi
    say "W3 $d: QPS $q via $url (limit $limit s)"
    timeout "$limit" $MS bench serve --base-url "$url" --qps "$q" --client-procs "$CLIENT_PROCS" --no-progress \
      $W3_EXTRA --output-json "$d/w3_$q.json" > "$d/w3_$q.txt" 2>&1
    say "W3 $d QPS $q: rc $?"
    grep -E "^QPS" "$d/w3_$q.txt"
    for port in ${ports//,/ }; do
      curl -s -m 10 "127.0.0.1:$port/metrics" | grep -E "^meshserve:admission_margin" > "$d/metrics_${port}_$q.txt"
    done
  done
  kill $LOGGERS 2> /dev/null; LOGGERS=""
  python3 - "$d" << 'PY'
import glob, json, os, sys
d = sys.argv[1]
parts = [json.load(open(f)) for f in glob.glob(os.path.join(d, "w3_*.json"))]
if parts:
    merged = dict(parts[0], points=sorted((p for part in parts for p in part["points"]), key=lambda p: p["qps"]))
    json.dump(merged, open(os.path.join(d, "w3.json"), "w"), indent=1)
PY
  return 0
}

# -- replica a (it builds a one-layer 8B on the CPU: ~15 s) -------------------------------------------------------
start_replica a $PORT_A "$W/direct"; PID_A=$REPLICA_PID
wait_ready $PORT_A "$PID_A" $REPLICA_LIMIT || { tail -30 "$W/direct/serve_a.log"; exit 1; }
say "replica a ready"

# -- (1) straight to replica a ----------------------------------------------------------------------------------
w3 "$W/direct" "http://127.0.0.1:$PORT_A" "$QPS_DIRECT" $PORT_A serve_a=$PID_A
cleanup  # a fresh pair for the router's run: the direct run's step-time fit and cache left behind

# -- (2) through the router in front of a and b -----------------------------------------------------------------
start_replica a $PORT_A "$W/dp2_router"; PID_A=$REPLICA_PID
start_replica b $PORT_B "$W/dp2_router"; PID_B=$REPLICA_PID
if wait_ready $PORT_A "$PID_A" $REPLICA_LIMIT && wait_ready $PORT_B "$PID_B" $REPLICA_LIMIT; then
  setsid $MS router --host 127.0.0.1 --port $ROUTER_PORT --backend http://127.0.0.1:$PORT_A \
    --backend http://127.0.0.1:$PORT_B --workers "$ROUTER_WORKERS" --disable-access-log --health-interval 1 \
    --health-timeout 5 --retry-after 1 > "$W/dp2_router/router.log" 2>&1 &
  ROUTER_PID=$!
  if wait_ready $ROUTER_PORT "$ROUTER_PID" 30; then
    sleep 2  # a health round: both replicas admitted
    w3 "$W/dp2_router" "http://127.0.0.1:$ROUTER_PORT" "$QPS" "$PORT_A,$PORT_B" router=$ROUTER_PID serve_a=$PID_A \
      serve_b=$PID_B
  else
    tail -20 "$W/dp2_router/router.log"
  fi
else
  tail -20 "$W/dp2_router/serve_a.log" "$W/dp2_router/serve_b.log"
fi
cleanup

tar czf "$OUT/router_dp.tgz" -C "$W" env.txt direct dp2_router
python3 -m meshserve.simulator.validation_dp_router summary "$W" 2>&1 | tee "$OUT/summary.txt"
say "done: $(ls "$OUT" | tr '\n' ' ')"
