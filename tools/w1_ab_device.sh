#!/usr/bin/env bash
# W1 (batch-1 decode, `meshserve bench latency --no-baseline`, CUDA graphs) under switch settings, one tok/s line
# per run, for A/Bs of issue 29's launch cuts on one H200. A job is MODEL:SETTINGS, SETTINGS "default" or
# NAME=VALUE pairs joined by "+", each NAME taken as MESHSERVE_NAME (layers/backend_selection.py), e.g.
#   JOBS="qwen:default qwen:NORM_FOLD=1 qwen:DECODE_REDUCE=inline qwen:NORM_FOLD=1+DECODE_REDUCE=inline
#         8b:default 8b:NORM_FOLD=1" bash tools/w1_ab_device.sh
# MODEL: qwen (Qwen3-0.6B), 8b (Llama-3.1-8B) or a preset name. Runs go in the order given and stop starting new
# ones past BUDGET seconds (default 420). REPEAT=N (default 3) runs the whole list N times, interleaved, and ends
# with each job's median, min and max: W1 on Qwen3-0.6B varied 680-1,073 tok/s from one process to the next with
# the same settings on one H200 (2026-12-02, BENCHMARKS.md "Twenty-first session"), so a one-run A/B of a small
# model says nothing. Each run also prints the batch-1 decode graph's device time (replayed back to back) beside
# the wall time of a decode token (which side moved) and the SM clock's median during the timed runs; steps_ms is
# the graph time averaged over W1's steps, each at the graph it replays (a small model's W1 replays the 256- and
# 1,024-token bounds' graphs; graph_ms times only the last step's). Logs and JSON: $OUT/w1_ab.tgz.
# BENCH=throughput runs W2 (`bench throughput`) instead: the columns are output tok/s and W2's seconds (W2 Qwen3-0.6B
# moved 6% between two processes of one build on 2026-12-02: REPEAT >= 2 there too).
# BENCH_ARGS are added to every bench command, e.g. BENCH_ARGS="--repeat 3" (W2: three timed runs in each process,
# from a cold prefix cache; the median is the w2_s column, every run in runs_s). A setting that starts with "--" is
# a bench flag of that job alone, e.g. BENCH=throughput JOBS="qwen:default qwen:--max-cudagraph-tokens=8192".
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/w1_ab; rm -rf $R; mkdir -p $R $OUT  # this call's runs only (a warm machine keeps /tmp)
model_name() { case $1 in qwen) echo qwen3-0.6b ;; 8b) echo llama-3.1-8b ;; *) echo "$1" ;; esac; }
t_start=$SECONDS
bench=${BENCH:-latency}
case $bench in latency|throughput) ;; *) echo "BENCH must be latency or throughput, got $bench"; exit 1 ;; esac
if [ "$bench" = throughput ]; then
  printf "%-8s %-44s %9s %9s %8s %8s %8s %6s %5s\n" model settings "out tok/s" w2_s runs_s sm_mhz power_w - secs
else
  printf "%-8s %-44s %9s %9s %8s %8s %8s %6s %5s\n" model settings "tok/s" decode graph_ms steps_ms token_ms sm_mhz \
    secs
fi
for round in $(seq 1 ${REPEAT:-3}); do
  for job in ${JOBS:?JOBS is required}; do
    model=$(model_name ${job%%:*}); settings=${job#*:}
    if [ $((SECONDS - t_start)) -ge ${BUDGET:-420} ]; then echo "skip $job (budget)"; continue; fi
    envs=(); args=()
    if [ "$settings" != default ]; then
      IFS=+ read -ra pairs <<< "$settings"
      for pair in "${pairs[@]}"; do
        case $pair in --*) args+=("$pair") ;; *) envs+=("MESHSERVE_$pair") ;; esac
      done
    fi
    name="${round}_${job//[:=+,]/_}"
    t0=$SECONDS
    env "${envs[@]}" timeout ${LIMIT:-120} python3 -m meshserve.cli --log-level INFO bench $bench --model $model \
      --no-baseline ${BENCH_ARGS:-} "${args[@]}" --output-json $R/$name.json > $R/$name.log 2>&1
    rc=$?
    tok=$(python3 tools/w1_ab_row.py $R/$name.json 2> /dev/null || echo "rc=$rc - - - - -")
    printf "%-8s %-44s %9s %9s %8s %8s %8s %6s %5s\n" ${job%%:*} "$settings" $tok $((SECONDS - t0))
    [ $rc -ne 0 ] && grep -E "Error|error" $R/$name.log | tail -3
  done
done
python3 - $R <<'PY'
import collections, glob, json, os, statistics, sys
runs = collections.defaultdict(list)
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    job = os.path.basename(path)[:-5].split("_", 1)[1]  # round_job
    r = json.load(open(path))
    runs[job].append(r["tok_s"] if "tok_s" in r else r["output_tok_s"])
print(f"{'job':<52} {'runs':>4} {'median':>8} {'min':>8} {'max':>8}")
for job, tok in runs.items():
    print(f"{job:<52} {len(tok):>4} {statistics.median(tok):>8.1f} {min(tok):>8.1f} {max(tok):>8.1f}")
PY
tar czf $OUT/w1_ab.tgz -C /tmp w1_ab
