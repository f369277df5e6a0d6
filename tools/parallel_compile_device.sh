#!/usr/bin/env bash
# Issue 29, start-up on a cold Triton cache: start to ready (`meshserve bench latency --no-baseline`'s start_s,
# dummy weights) with the parallel pre-compile off, on threads and on processes (MESHSERVE_PARALLEL_COMPILE=0 / 1 /
# procs; engine/parallel_warmup.py, kernels/process_compile_pool.py), each start on its own empty
# TRITON_CACHE_DIR, for Llama-3.1-8B and DeepSeek-V2-Lite;
# then the 8B warm (the cache its cold run filled) off and on, which is what the switch costs a warm start.
# First, tools/parallel_compile_probe.py: N specializations in sequence vs on the pool (no engine: the raw
# thread scaling of this machine's Triton). Prints one line per start (start_s, W1 tok/s, the passes) and its
# start-up timeline (every phase's seconds; a parallel pass's Triton seconds are its threads' sum). Logs and
# JSON in $OUT/parallel_compile.tgz. Jobs past BUDGET seconds (default 480) are skipped: one call < 9 minutes.
# Usage (device, repo root):  bash tools/parallel_compile_device.sh
#   JOBS="8b:cold:0 8b:cold:1 ..." (model 8b|dsv2, cold|warm, switch 0|1|procs), PROBE=0 to skip the probe,
#   threads vs processes, cold, in one call: JOBS="8b:cold:1 8b:cold:procs 8b:cold:1 8b:cold:procs" PROBE=0 \
#     bash tools/parallel_compile_device.sh
#   TESTS=1 to run tests/gpu/test_gpu_parallel_compile.py first (per family two cold tiny-model starts and a warm
#   one: several minutes; best as its own call: TESTS=1 PROBE=0 JOBS=" " bash tools/parallel_compile_device.sh)
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/parallel_compile; rm -rf $R; mkdir -p $R $OUT
t_start=$SECONDS
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import triton, torch, os; print('triton', triton.__version__, 'torch', torch.__version__, os.cpu_count(), 'cores')"

if [ "${TESTS:-0}" = 1 ]; then
  timeout 560 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_gpu_parallel_compile.py > $R/tests.log 2>&1
  echo "== gpu tests rc $?: $(tail -1 $R/tests.log)"; grep -E "^FAILED|Error|assert" $R/tests.log | head -8
fi
if [ "${PROBE:-1}" = 1 ]; then
  echo "== probe: compile scaling without an engine"
  timeout 120 python3 tools/parallel_compile_probe.py 32 1,4,16 2>&1 | tee $R/probe.log | grep -v "^INFO"
fi

model_name() { case $1 in 8b) echo llama-3.1-8b ;; dsv2) echo deepseek-v2-lite ;; *) echo "$1" ;; esac; }
DEFAULT_JOBS="8b:cold:0 8b:cold:1 8b:cold:procs dsv2:cold:0 dsv2:cold:1 dsv2:cold:procs 8b:warm:0 8b:warm:1"
printf "%-5s %-4s %-6s %8s %8s  %s\n" model cache switch "start_s" "tok/s" "parallel passes"
for job in ${JOBS:-$DEFAULT_JOBS}; do
  IFS=: read -r m cache sw <<< "$job"
  model=$(model_name "$m")
  if [ $((SECONDS - t_start)) -ge ${BUDGET:-480} ]; then echo "skip $job (budget)"; continue; fi
  left=$((${LIMIT:-540} - (SECONDS - t_start))); [ $left -gt 300 ] && left=300  # the whole call stays < 9.5 min
  case $cache in
  cold) dir=$(mktemp -d) ;;
  warm) dir=$R/cache_$m; [ -d "$dir" ] || { echo "skip $job: no cold run of $m filled $dir"; continue; } ;;
  esac
  log=$R/${m}_${cache}_${sw}.log; json=$R/${m}_${cache}_${sw}.json
  TRITON_CACHE_DIR=$dir MESHSERVE_PARALLEL_COMPILE=$sw timeout $left python3 -m meshserve.cli --log-level INFO \
    bench latency --model "$model" --no-baseline --output-json "$json" > "$log" 2>&1
  rc=$?
  # the 8B's cold caches (either switch: same kernels) serve its warm runs
  [ "$cache" = cold ] && [ ! -d "$R/cache_$m" ] && [ $rc = 0 ] && cp -r "$dir" "$R/cache_$m"
  if [ $rc != 0 ] || [ ! -f "$json" ]; then echo "$job: rc $rc"; tail -5 "$log"; continue; fi
  passes=$(grep -oE "[a-z -]*: [0-9]+ Triton specializations \([0-9]+ compiled[^)]*\) on [0-9]+ (threads|processes) in [0-9.]+ s( \([0-9]+ compiled in the engine process\))?" \
    "$log" | sed -E 's/ Triton specializations \(([0-9]+) compiled[^)]*\)/ (\1 compiled)/; s/ threads in/ thr/; s/ processes in/ procs/; s/ compiled in the engine process/ fell back/' \
    | paste -sd ';' -)
  grep -q "no parallel pass for the warm-ups" "$log" && passes="$passes; warm-up pass skipped (warm cache)"
  python3 - "$json" "$m" "$cache" "$sw" "${passes:--}" << 'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:5s} {sys.argv[3]:4s} {sys.argv[4]:6s} {r['start_s']:8.1f} {r['tok_s']:8.1f}  {sys.argv[5]}")
PY
  grep -m1 "start-up, seconds since launch" "$log" | sed 's/^.*start-up, seconds since launch: /    /'
done
grep -h "start-up, seconds since launch" $R/*.log > $R/timelines.txt 2> /dev/null
tar czf $OUT/parallel_compile.tgz --exclude='parallel_compile/cache_*' -C /tmp parallel_compile 2> /dev/null
echo "total $((SECONDS - t_start)) s; logs in \$OUT/parallel_compile.tgz"
