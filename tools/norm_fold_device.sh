#!/usr/bin/env bash
# MESHSERVE_NORM_FOLD A/B on one H200 (layers/norm_fold.py, issue 29): W1 batch-1 decode (`meshserve bench latency
# --no-baseline`, CUDA graphs) with the switch off and on, alternating (off on off on) so drift shows, one tok/s
# line per run; runs stop starting past BUDGET seconds (default 420). TESTS=1 runs the fold's GPU tests instead
# (~5 min: a call of its own). Usage (device, repo root):
#   [MODELS="llama-3.1-8b qwen3-0.6b"] [BUDGET=420] bash tools/norm_fold_device.sh
#   TESTS=1 bash tools/norm_fold_device.sh
# Logs and JSON: $OUT/norm_fold_ab.tgz.
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/norm_fold_ab; mkdir -p $R $OUT

if [ "${TESTS:-0}" = 1 ]; then
  timeout 570 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_triton_norm_fold.py \
    tests/gpu/test_gpu_norm_fold.py > $R/gpu_tests.log 2>&1
  echo "== gpu tests rc $?: $(tail -1 $R/gpu_tests.log)"; grep -E "^FAILED|Error" $R/gpu_tests.log | head -8
  tar czf $OUT/norm_fold_tests.tgz -C /tmp norm_fold_ab; exit 0
fi
t_start=$SECONDS
printf "%-14s %-5s %10s %10s %6s\n" model fold "tok/s" "decode" "secs"
for model in ${MODELS:-llama-3.1-8b qwen3-0.6b}; do
  for run in off_1 on_1 off_2 on_2; do
    if [ $((SECONDS - t_start)) -ge ${BUDGET:-420} ]; then echo "skip $model $run (budget)"; continue; fi
    t0=$SECONDS
    fold=$([ "${run%_*}" = on ] && echo 1 || echo 0)
    MESHSERVE_NORM_FOLD=$fold timeout ${LIMIT:-120} python3 -m meshserve.cli --log-level INFO bench latency \
      --model $model --no-baseline --output-json $R/${model}_$run.json > $R/${model}_$run.log 2>&1
    rc=$?
    tok=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['tok_s']:.1f} {r['decode_tok_s']:.1f}\")" \
          $R/${model}_$run.json 2>/dev/null || echo "rc=$rc -")
    # the selection the runner bound (its INFO line), to see that the switch took
    bound=$(grep -o "norm_fold=[A-Za-z]*" $R/${model}_$run.log | head -1)
    printf "%-14s %-5s %10s %10s %6s  %s\n" $model $run $tok $((SECONDS - t0)) "${bound:--}"
    [ $rc -ne 0 ] && grep -E "Error|error" $R/${model}_$run.log | tail -3
  done
done
tar czf $OUT/norm_fold_ab.tgz -C /tmp norm_fold_ab
