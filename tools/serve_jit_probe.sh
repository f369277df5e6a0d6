#!/usr/bin/env bash
# Does any Triton kernel compile while the server serves (issue 18: "no first-request compiles")? Starts
# `meshserve serve` with the jit_variants hook (tools/jit_variants: one line per kernel specialization built,
# per process), waits until it answers /health, then runs a short W3 (`meshserve bench serve` at low QPS) and the
# mixed-request client (tools/serve_jit_client.py: every sampling path, prompts of 1-3,000 ids, bursts past the
# mixed-step graphs). Lists every specialization built after start-up, by phase; 0 is the goal.
# Usage (device, repo root, wheels in .whl): MODEL=llama-3.1-8b QPS=4,16 RUNS="cold warm" bash tools/serve_jit_probe.sh [serve flags...]
# Results under $OUT/serve_jit/ (logs, bench JSON, the hook's lines, the summary).
set -u -o pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/tools/jit_variants:$PWD:/tmp/site
OUT=${OUT:-/tmp/out}; R=$OUT/serve_jit; mkdir -p $R; MODEL=${MODEL:-llama-3.1-8b}; QPS=${QPS:-4,16}
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
python3 -m meshserve.cli bench tokenizer /tmp/tok >/dev/null || exit 1
for run in ${RUNS:-cold}; do
  [ $run = cold ] && rm -rf /tmp/tc; export TRITON_CACHE_DIR=/tmp/tc JIT_VARIANTS_LOG=$R/jit_$run
  python3 -m meshserve.cli serve $MODEL --load-format dummy --tokenizer /tmp/tok --max-model-len 4096 --port 8000 \
    --disable-access-log "$@" > $R/serve_$run.log 2>&1 &
  pid=$! t0=$(date +%s)
  for i in $(seq 1 400); do
    curl -sf localhost:8000/health >/dev/null && break
    kill -0 $pid 2>/dev/null || { echo "server died"; tail -30 $R/serve_$run.log; exit 1; }
    sleep 1
  done
  python3 -c "import time; print(time.time())" > $R/t_ready_$run
  echo "$run: ready after $(( $(date +%s) - t0 )) s"
  timeout ${LIMIT:-300} python3 -m meshserve.cli bench serve --qps $QPS --no-progress --output-json $R/w3_$run.json \
    > $R/w3_$run.txt 2>&1; tail -12 $R/w3_$run.txt
  python3 -c "import time; print(time.time())" > $R/t_w3_$run
  timeout ${LIMIT:-300} python3 tools/serve_jit_client.py --max-len 4096 | tee $R/client_$run.txt
  kill -TERM $pid; wait $pid
  python3 - $R $run <<'PY' | tee $R/summary_$run.txt
import glob, sys
r, run = sys.argv[1], sys.argv[2]
t_ready, t_w3 = (float(open(f"{r}/{n}_{run}").read()) for n in ("t_ready", "t_w3"))
rows = [line.rstrip("\n").split("\t") for f in glob.glob(f"{r}/jit_{run}.*") for line in open(f)]
late = sorted((float(x[0]), x[2], x[3] + " " + x[4]) for x in rows if float(x[0]) > t_ready)
print(f"{run}: {len(rows)} specializations built in all, {len(late)} after start-up "
      f"({sum(t < t_w3 for t, _, _ in late)} during W3, {sum(t >= t_w3 for t, _, _ in late)} during the mixed client)")
for t, name, consts in late:
    print(f"  {'W3   ' if t < t_w3 else 'mixed'} +{t - t_ready:7.2f} s {name[:60]} {consts[:400]}")
PY
  echo "$run: the server's own log (kernels/late_jit_log.py): $(grep -c 'a first-request compile' $R/serve_$run.log) builds after start-up" \
    | tee -a $R/summary_$run.txt
done
