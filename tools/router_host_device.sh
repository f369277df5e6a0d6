#!/usr/bin/env bash
# Issue 28: the router's costs on the GPU host, and W3 through the current router in front of one replica (one call
# on nvidia-h200, ~6.5 min: rows ~110 s, each W3 run ~110 s, a replica's start ~20 s warm). The simulator's router
# node (router_node.py) was calibrated on the 2-core CPU box with the router before a54870b (router_calibration.toml
# `cpu_light`); the tenth session's "W3 DP=2 through the router" rows miss by 37-58%, that router having run on the
# GPU host. This measures, on the GPU host:
#   (1) the router's CPU per request / refusal / event: `meshserve bench frontend --through-router` (the current
#       router, --workers 1, in front of the real API server around the model-less fake core), the rows cpu_light is
#       fitted to (c16_t128, c16_t16, refuse_c32) and c128_t128 (cpu_loaded's load) as a check; run while the
#       replica below loads (they use a few of the 16 cores; what they measure is the router's CPU time), the
#       check row first (it overlaps the replica's start-up the most);
#   (2) W3 with targets (tools/w3_slo.sh's server flags, a 4-process client) at QPS 32,64,128 through `meshserve
#       router --workers 1` (one router process: the one FCFS queue the simulator models; ROUTER_WORKERS=N for
#       another count) in front of ONE `meshserve serve` replica of llama-3.1-8b (dummy weights), with the router's
#       and the replica's CPU logged each second (tools/proc_cpu.py); then the same W3 straight to a fresh replica
#       (a restart: each QPS point's prompts would hit the first run's prefix cache).
# Usage (device, repo root, carry .whl and .whl-tf): bash tools/router_host_device.sh
# Env: QPS (32,64,128), QPS_DIRECT (QPS), ROUTER_WORKERS (1), ROWS ("c128_t128 c16_t128 c16_t16 refuse_c32"),
#   ROW_S (15: each row's --duration), BUDGET (500: no phase starts that would end past it, in s since start),
#   MODEL (llama-3.1-8b), CLIENT_PROCS (4), W3 (1; 0: the router rows only).
# DRY=1 (the CPU box, no GPU): the same shell logic with the replica replaced by bench/frontend_server.py (the
#   real API server around the fake core), short rows (ROW_S 3) and W3 points of 40 prompts at QPS 4,8; no
#   device_env.sh (its carried wheels are the device's Python's).
# Results: $OUT/router_host.tgz (router_rows/ with each row's JSON and log; w3_router/ and w3_direct/ with w3.json,
#   w3.txt, serve.log, steps.jsonl, metrics, proc_cpu_*.jsonl and router.log; env.txt) and $OUT/summary.txt. On the
#   CPU box afterwards (tar xzf router_host.tgz in a results folder DIR):
#   python -m meshserve.simulator.validation_router_host fit DIR     # the router_calibration.toml entry
#   python -m meshserve.simulator.validation_router_host table DIR   # W3 replayed, predicted vs measured
set -u -o pipefail
. "$(dirname "${BASH_SOURCE[0]}")/serve_procs.sh"  # script_env, host_facts, kill_group, wait_ready
script_env /tmp/router_host_dry
T0=$SECONDS
MS="python3 -m meshserve.cli"
MODEL=${MODEL:-llama-3.1-8b}
QPS=${QPS:-32,64,128}
QPS_DIRECT=${QPS_DIRECT:-$QPS}
ROUTER_WORKERS=${ROUTER_WORKERS:-1}
ROWS=${ROWS:-c128_t128 c16_t128 c16_t16 refuse_c32}
ROW_S=${ROW_S:-15}
BUDGET=${BUDGET:-500}
CLIENT_PROCS=${CLIENT_PROCS:-4}
W3_EXTRA=""
REPLICA_LIMIT=150  # seconds for a replica to answer /health and /v1/models
if [ "${DRY:-0}" = 1 ]; then
  QPS=${QPS_DRY:-4,8} QPS_DIRECT=$QPS ROW_S=${ROW_S_DRY:-3} W3_EXTRA="--num-prompts 40" REPLICA_LIMIT=60
fi
W=/tmp/router_host_work
rm -rf "$W"; mkdir -p "$W/router_rows" "$W/w3_router" "$W/w3_direct" "$OUT"
REPLICA_PORT=8001 ROUTER_PORT=8000
say() { echo "[$(( SECONDS - T0 )) s] $*"; }
left() { echo $(( BUDGET - (SECONDS - T0) )); }

# -- the machine -------------------------------------------------------------------------------------------
{
  host_facts
  echo "model $MODEL qps_router $QPS qps_direct $QPS_DIRECT router_workers $ROUTER_WORKERS rows $ROWS row_s $ROW_S dry ${DRY:-0}"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null | sed 's/^/gpu /'
} > "$W/env.txt"
cat "$W/env.txt"

SERVE_PID="" ROUTER_PID="" LOGGERS=""
cleanup() {
  [ -n "$LOGGERS" ] && kill $LOGGERS 2> /dev/null
  kill_group "$ROUTER_PID"; kill_group "$SERVE_PID"
  LOGGERS="" ROUTER_PID="" SERVE_PID=""
}
trap cleanup EXIT
# start_replica DIR: one replica on REPLICA_PORT, its log and step trace in DIR (does not wait)
start_replica() {
  local d=$1
  if [ "${DRY:-0}" = 1 ]; then
    setsid python3 -m meshserve.bench.frontend_server --host 127.0.0.1 --port $REPLICA_PORT --step-ms 20 \
      --max-num-seqs 64 --slo-ttft-ms 1000 > "$d/serve.log" 2>&1 &
  else
    setsid $MS serve "$MODEL" --load-format dummy --tokenizer /tmp/tok --max-model-len 4096 --host 127.0.0.1 \
      --port $REPLICA_PORT --disable-access-log --slo-ttft-ms 1000 --slo-tpot-ms 50 --step-trace "$d/steps.jsonl" \
      > "$d/serve.log" 2>&1 &
  fi
  SERVE_PID=$! SERVE_T0=$SECONDS
}
replica_ready() {
  wait_ready $REPLICA_PORT "$SERVE_PID" $REPLICA_LIMIT || { tail -30 "$1/serve.log"; return 1; }
  say "replica ready after $(( SECONDS - SERVE_T0 )) s"
  grep -m1 "start-up, seconds since launch" "$1/serve.log"
  return 0
}
# w3 DIR URL QPS: W3 with targets at QPS through URL, every process's CPU each second (router, replica tree)
w3() {
  local d=$1 url=$2 qps=$3 npts limit
  npts=$(echo "$qps" | tr ',' ' ' | wc -w)
  limit=$(( 50 * npts + 30 )); (( limit > $(left) )) && limit=$(left)
  if (( limit < 40 )); then say "W3 $d: skipped ($(left) s of the budget left)"; return 1; fi
  python3 tools/proc_cpu.py log "$SERVE_PID" 1 > "$d/proc_cpu_serve.jsonl" 2> /dev/null &
  LOGGERS="$!"
  if [ -n "$ROUTER_PID" ]; then
    python3 tools/proc_cpu.py log "$ROUTER_PID" 1 > "$d/proc_cpu_router.jsonl" 2> /dev/null &
    LOGGERS="$LOGGERS $!"
  fi
  say "W3 $d: QPS $qps via $url (limit $limit s)"
  timeout "$limit" $MS bench serve --base-url "$url" --qps "$qps" --client-procs "$CLIENT_PROCS" --no-progress \
    $W3_EXTRA --output-json "$d/w3.json" > "$d/w3.txt" 2>&1
  say "W3 $d: rc $?"
  grep -E "^QPS" "$d/w3.txt"
  kill $LOGGERS 2> /dev/null; LOGGERS=""
  curl -s -m 10 127.0.0.1:$REPLICA_PORT/metrics | grep -E "^meshserve:(requests_(rejected|refused_at_gate|shed|slo|total)|step_time|queue_wait|admission_margin)" \
    > "$d/metrics.txt"
  [ -n "$ROUTER_PID" ] && curl -s -m 10 127.0.0.1:$ROUTER_PORT/metrics | head -c 200000 > "$d/router_metrics.txt"
  return 0
}

# -- (1) the router's CPU costs, while the first replica loads -----------------------------------------------
FE_MODEL=""
if [ "${DRY:-0}" != 1 ]; then
  $MS bench tokenizer /tmp/tok --model "$MODEL" > /dev/null || exit 1
  # the rows' server: the preset's config and generated tokenizer (the embedded model's 98 MB GGUF is not on
  # the device; the router relays bytes, its CPU per event does not depend on the tokenizer)
  FE_MODEL="--model $MODEL --tokenizer /tmp/tok"
fi
[ "${W3:-1}" = 1 ] && start_replica "$W/w3_router"
say "replica starting (pid $SERVE_PID); the router rows meanwhile"
for row in $ROWS; do
  case $row in
    c16_t128) flags="--concurrency 16 --max-tokens 128" ;;
    c16_t16) flags="--concurrency 16 --max-tokens 16" ;;
    refuse_c32) flags="--concurrency 32 --max-num-seqs 8 --max-queue-len 1" ;;
    c128_t128) flags="--concurrency 128 --max-tokens 128" ;;
    *) echo "unknown row $row"; continue ;;
  esac
  if (( $(left) < ROW_S + 200 )); then say "row $row: skipped ($(left) s of the budget left)"; continue; fi
  load=$(cut -d' ' -f1 /proc/loadavg)
  timeout $(( ROW_S + 60 )) $MS bench frontend --through-router --duration "$ROW_S" $flags $FE_MODEL \
    --output-json "$W/router_rows/$row.json" > "$W/router_rows/$row.log" 2>&1
  rc=$?
  python3 - "$W/router_rows/$row.json" "$row" "$rc" "$(( SECONDS - T0 ))" "$load" << 'PY'
import json, sys
path, row, rc, t, load = sys.argv[1:]
try:
    r = json.load(open(path))[0]
    print(f"[{t} s] row {row}: rc {rc}, {r['requests']} requests ({r['rejected']} refused), {r['tokens']} tokens, "
          f"{r['events']} events, {r['chunks']} chunks, router CPU {r['router CPU s']} s "
          f"({r['router cores busy']} of a core), TTFT p50 {r['TTFT p50 ms']} ms; load {load} before")
except (OSError, ValueError, KeyError, IndexError) as e:
    print(f"[{t} s] row {row}: rc {rc}, no row ({e!r})")
PY
  [ "$rc" = 0 ] || tail -5 "$W/router_rows/$row.log"
done

# -- (2) W3 through the router in front of the replica -------------------------------------------------------
if [ "${W3:-1}" = 1 ] && replica_ready "$W/w3_router"; then
  setsid $MS router --host 127.0.0.1 --port $ROUTER_PORT --backend http://127.0.0.1:$REPLICA_PORT \
    --workers "$ROUTER_WORKERS" --disable-access-log --health-interval 1 --health-timeout 5 --retry-after 1 \
    > "$W/w3_router/router.log" 2>&1 &
  ROUTER_PID=$!
  if wait_ready $ROUTER_PORT "$ROUTER_PID" 30; then
    sleep 2  # a health round: the replica admitted
    w3 "$W/w3_router" "http://127.0.0.1:$ROUTER_PORT" "$QPS"
  else
    tail -20 "$W/w3_router/router.log"
  fi
fi
cleanup

# -- (2') the same W3 straight to a fresh replica --------------------------------------------------------------
if [ "${W3:-1}" != 1 ]; then
  say "W3: not run (W3=0)"
elif (( $(left) < 90 )); then
  say "W3 direct: skipped ($(left) s of the budget left)"
else
  start_replica "$W/w3_direct"
  replica_ready "$W/w3_direct" && w3 "$W/w3_direct" "http://127.0.0.1:$REPLICA_PORT" "$QPS_DIRECT"
  cleanup
fi

# -- results ---------------------------------------------------------------------------------------------------
tar czf "$OUT/router_host.tgz" -C "$W" env.txt router_rows w3_router w3_direct
python3 -m meshserve.simulator.validation_router_host summary "$W" 2>&1 | tee "$OUT/summary.txt"
say "done: $(ls "$OUT" | tr '\n' ' ')"
