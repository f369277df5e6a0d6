#!/usr/bin/env bash
# W3 on the device with service-level targets on (issue 18): `meshserve serve` with --slo-ttft-ms/--slo-tpot-ms
# and a per-step trace, then `meshserve bench serve` over QPS points; results, trace and metrics under $OUT.
# Usage (device, from the repo root, wheels in .whl): bash tools/w3_slo.sh [QPS list] [extra serve flags...]
# CLIENT_PROCS (default 4): client processes sending the load (one falls behind at QPS 96: send lag p99 4-5 s)
# MODEL (default llama-3.1-8b): the preset served (dummy weights); issue 18 measures qwen3-0.6b too
# TAR=1: everything the run wrote as one $OUT/w3_run.tgz (the steps trace included)
# CORE_TIMING=1: the engine core's thread CPU per loop iteration by part (MESHSERVE_CORE_TIMING, engine/core_timing.py;
#   a few us a step), written when the server stops and summarized at the end over the iterations with >= 200
#   running (tools/real_core_w3.py's summary): is the host-bound core's step its own CPU, or time its thread did not
#   run? CORE_PROFILE=1: a cProfile of the core loop too (MESHSERVE_CORE_PROFILE; it about doubles the loop's CPU,
#   so the run's goodput is not W3's: a run of its own)
set -u -o pipefail
qps=${1:-32,48,64,96}; shift || true
client_procs=${CLIENT_PROCS:-4}
model=${MODEL:-llama-3.1-8b}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
python3 -m meshserve.cli bench tokenizer /tmp/tok --model $model >/dev/null || exit 1
[ "${CORE_TIMING:-0}" = 1 ] && export MESHSERVE_CORE_TIMING=$OUT/core_timing
[ "${CORE_PROFILE:-0}" = 1 ] && export MESHSERVE_CORE_PROFILE=$OUT/core_loop
python3 -m meshserve.cli serve $model --load-format dummy --tokenizer /tmp/tok --max-model-len 4096 \
  --port 8000 --disable-access-log --slo-ttft-ms 1000 --slo-tpot-ms 50 --step-trace $OUT/steps.jsonl "$@" \
  > $OUT/serve.log 2>&1 &
pid=$! t0=$(date +%s)
for i in $(seq 1 400); do
  curl -sf localhost:8000/health >/dev/null && curl -sf localhost:8000/v1/models >/dev/null && break
  kill -0 $pid 2>/dev/null || { echo "server died"; tail -30 $OUT/serve.log; exit 1; }
  sleep 1
done
echo "ready after $(( $(date +%s) - t0 )) s"
# every phase of every process (engine/startup_timeline.py); with several API processes the line comes after
# /health answers (the front end logs it once every API process said it listens): wait for it a little
for _ in $(seq 1 20); do grep -q "start-up, seconds since launch" $OUT/serve.log && break; sleep 0.5; done
grep -m1 "start-up, seconds since launch" $OUT/serve.log
# the GPU's clocks and power under the load (is a compute-bound step power-capped? GEMMs run ~20% slower under W3
# than in tools/mixed_graph_bench.py's isolated replays)
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu --format=csv,nounits \
  -lms 500 > $OUT/gpu_clocks.csv 2> /dev/null &
smi=$!
# every process's CPU seconds each second (the API processes' cost per request / token for the simulator's
# front-end model, issue 28), with wall times to cut it by QPS point against w3.json
python3 tools/proc_cpu.py log $pid 1 > $OUT/proc_cpu.jsonl 2> /dev/null &
cpulog=$!
timeout 420 python3 -m meshserve.cli bench serve --qps $qps --client-procs $client_procs --no-progress --output-json $OUT/w3.json 2>&1 | tee $OUT/w3.txt
kill $smi $cpulog 2> /dev/null
python3 - "$OUT/gpu_clocks.csv" << 'PY'
import csv, statistics, sys
rows = [r for r in csv.reader(open(sys.argv[1]))][1:]
busy = [r for r in rows if len(r) > 5 and r[5].strip().isdigit() and int(r[5]) >= 90]
if busy:
    med = lambda i: statistics.median(float(r[i]) for r in busy)
    print(f"GPU while >= 90% busy ({len(busy)} samples): SM clock p50 {med(1):.0f} MHz (min {min(float(r[1]) for r in busy):.0f}), "
          f"memory clock {med(2):.0f} MHz, power p50 {med(3):.0f} W, temperature p50 {med(4):.0f} C")
PY
curl -s localhost:8000/metrics | grep -E "^meshserve:(requests_(rejected|refused_at_gate|shed|slo|total)|step_time|queue_wait|admission_margin)" | tee $OUT/metrics.txt
kill -TERM $pid; wait $pid
if [ "${CORE_TIMING:-0}" = 1 ]; then
  cp $OUT/core_timing.*.jsonl $OUT/timing.jsonl 2> /dev/null && python3 - "$OUT" << 'PY'
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("real_core_w3", "tools/real_core_w3.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print("core timing (>= 200 running):", json.dumps(mod.summarize(sys.argv[1], 200)))
PY
  rm -f $OUT/timing.jsonl
fi
for prof in $OUT/core_loop.*.prof; do
  [ -f "$prof" ] && python3 -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('cumtime').print_stats(30)" \
    "$prof" > $OUT/core_loop_top.txt && head -50 $OUT/core_loop_top.txt | tail -38
done
# TAR=1: the run's files as one $OUT/w3_run.tgz (a device call brings back 8 files: two runs' logs, traces and
# reports overflow it, as the sixteenth session's second W3 run did)
if [ "${TAR:-0}" = 1 ]; then
  (cd "$OUT" && tar czf w3_run.tgz --exclude=w3_run.tgz ./* && find . -maxdepth 1 -type f ! -name w3_run.tgz -delete)
fi
