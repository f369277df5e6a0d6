#!/usr/bin/env bash
# Which Triton kernels compile while W2 runs (not at start-up)? One cold-cache and one warm-cache run of this checkout;
# the cache entries written after start-up are listed with their kernel names (results in $OUT/w2_jit.tgz).
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
export PYTHONPATH=$PWD/tools/jit_variants:$PYTHONPATH  # the Triton JIT hook first
R=/tmp/w2_jit; mkdir -p $R; MODEL=${MODEL:-qwen3-0.6b}
for run in ${RUNS:-cold warm}; do
  [ $run = cold ] && rm -rf /tmp/tc; export TRITON_CACHE_DIR=/tmp/tc
  touch $R/t0_$run; export JIT_VARIANTS_LOG=$R/jit_$run
  timeout ${LIMIT:-120} python3 -m meshserve.cli bench throughput --model $MODEL --no-baseline ${EXTRA:-} \
    --output-json $R/$run.json > $R/$run.log 2>&1
  python3 - $R/$run.json $R/jit_$run <<'PY'
import glob, json, os, sys
d = json.load(open(sys.argv[1]))
t_bench = os.path.getmtime(sys.argv[1]) - d["seconds"]  # the timed run starts here (the JSON is written at its end)
rows = [line.rstrip("\n").split("\t") for f in glob.glob(sys.argv[2] + ".*") for line in open(f)]
late_v = sorted((float(r[0]) - t_bench, r[2], r[3] + " " + r[4]) for r in rows if float(r[0]) > t_bench)
print(f"{len(rows)} specializations built in all, {len(late_v)} during the timed run:")
for dt, rep, consts in late_v:
    print(f"  +{dt:6.2f} s {rep[:60]} {consts[:600]}")
late = sorted((os.path.getmtime(f), f) for f in glob.glob("/tmp/tc/*/*.json") if "__grp__" not in f)
mid = [(t - t_bench, f) for t, f in late if t > t_bench]
print(f"seconds {d['seconds']:.2f} start_s {d['start_s']:.1f}; {len(late)} kernels on disk, {len(mid)} written after start-up")
PY
done
tar czf $OUT/w2_jit.tgz -C /tmp w2_jit
