#!/usr/bin/env bash
# Issue 22 on one H200 in one call: speculative decoding's mechanism on Llama-3.1-8B (dummy weights, bf16, CUDA
# graphs), `meshserve bench spec`:
#   1. --replay: batch 1, tok/s against controlled acceptance P for k = 2, 4, 8, beside no speculation;
#   2. --replay at batch 64 (the large-batch cost, goal >= 0.97x);
#   3. --w1 with the n-gram proposer (W1's token-id prompt: the dummy model's own repetitive continuation);
#   4. EAGLE-3's GPU tests and W1 with a random head (what a draft step costs), where EAGLE=1;
#   5. SKINNY=1 (alone unless PARTS is given): the skinny GEMV's GPU tests, its kernel times against cuBLAS at
#      M = 1/5/16 (a batch-1 verify step of k = 4 replays the 16-token mixed graph: its linears see 16 rows),
#      the spec GPU tests with it on, then the batch-1 replay (PS, default 0.9,1; KS, default 4,8) with
#      MESHSERVE_SKINNY_GEMV=0 and =1 back to back; SWEEP=5 also sweeps its tiles at 5 rows.
#   6. PARTS words beside b1 b64 ngram: "tests" (the spec GPU tests, pytest -v); "b1bucket" (b1 again with
#      MESHSERVE_SPEC_VERIFY_BUCKET=1: a k + 1 token mixed graph for the batch-1 verify step, the A/B);
#      "profile" (batch 1, k = 4, P = 1 under MESHSERVE_PROFILE_DIR: a window of plain decode steps and one
#      of verify steps, each through tools/trace_gaps.py: where the verify step's extra time goes).
# The JSON rows carry the gate's decision (gate_on at the end, gate_probes: steps speculating while off,
# gate_plain_probes, gate_step_s: its measured plain and verify step seconds at the run's batch,
# gate_verify_s).
# Each part stops starting past BUDGET seconds (default 540). JSON and logs: $OUT/spec.tgz and $OUT/*.log;
# summary to stdout.
# Usage (device, repo root, carry .whl):
#   [MODEL=llama-3.1-8b] [PARTS="b1 b64 ngram"] [PS=0,...] [KS=2,4,8] [FORCED=1] [EAGLE=1] [SKINNY=1 [SWEEP=5]]
#   bash tools/spec_device.sh
# Issue 22's check of the gate, the oracle and the verify bucket in one call (~5-6 min):
#   BUDGET=420 PARTS="tests b1 b1bucket b64 profile" PS=0.9,1 KS=4,8 bash tools/spec_device.sh
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/spec; mkdir -p $R $OUT
MODEL=${MODEL:-llama-3.1-8b}; MAXTOK=${MAXTOK:-256}; DTYPE=${DTYPE:-bfloat16}
t_start=$SECONDS
left() { echo $((${BUDGET:-540} - (SECONDS - t_start))); }
part() {  # NAME LIMIT ARGS...: one bench run, its table's rows to stdout
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -lt 30 ]; then echo "== $name: skipped (budget)"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  local t0=$SECONDS
  timeout "$limit" python3 -m meshserve.cli bench spec --model "$MODEL" --dtype "$DTYPE" --max-tokens "$MAXTOK" \
    --output-json $R/$name.json "$@" > $R/$name.log 2>&1
  echo "== $name: rc $?, $((SECONDS - t0)) s"; grep -E "^\|" $R/$name.log | head -40
  grep -E "Error|error:" $R/$name.log | grep -v -i warn | tail -3
}
nvidia-smi --query-gpu=name --format=csv,noheader
# bf16 near-ties end a plain replay after a few tokens: the references stand in for the argmax (FORCED=0: not)
forced=$([ "${FORCED:-1}" = 1 ] && echo --replay-forced)
default_parts=$([ "${SKINNY:-0}" = 1 ] && echo "" || echo "b1 b64 ngram")
parts=" ${PARTS-$default_parts} "
if [ "${SKINNY:-0}" = 1 ]; then
  timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_triton_skinny_gemv.py \
    > $R/skinny_tests.log 2>&1
  echo "== skinny gemv gpu tests rc $?: $(tail -1 $R/skinny_tests.log)"; grep -E "^FAILED" $R/skinny_tests.log | head -5
  timeout 240 python3 tools/bench_skinny_gemv.py --rows 1,5,16 ${SWEEP:+--sweep $SWEEP} --json $R/skinny_kernels.json \
    > $R/skinny_kernels.log 2>&1
  echo "== skinny gemv kernels rc $?"; grep -E "copy bandwidth| m= 5 | m=16 |step " $R/skinny_kernels.log | head -40
  MESHSERVE_SKINNY_GEMV=1 timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider \
    tests/gpu/test_gpu_spec_decode.py > $R/skinny_spec_tests.log 2>&1
  echo "== spec gpu tests with the skinny gemv rc $?: $(tail -1 $R/skinny_spec_tests.log)"
  grep -E "^FAILED" $R/skinny_spec_tests.log | head -5
  for s in 0 1; do
    export MESHSERVE_SKINNY_GEMV=$s
    part replay_b1_skinny$s 200 --replay "${PS:-0.9,1}" --replay-k "${KS:-4,8}" $forced
  done
  unset MESHSERVE_SKINNY_GEMV
fi
if [[ $parts == *" tests "* ]]; then
  timeout 200 python3 -m pytest -m gpu -v -p no:cacheprovider tests/gpu/test_gpu_spec_decode.py \
    tests/gpu/test_gpu_spec_async.py > $R/spec_gpu_tests.log 2>&1
  echo "== spec gpu tests rc $?: $(tail -1 $R/spec_gpu_tests.log)"; grep -E "^FAILED" $R/spec_gpu_tests.log | head -5
fi
[[ $parts == *" b1 "* ]] && part replay_b1 300 --replay "${PS:-0,0.3,0.5,0.6,0.7,0.8,0.9,1}" --replay-k "${KS:-2,4,8}" $forced
[[ $parts == *" b64 "* ]] && part replay_b64 150 --replay "${PS64:-0.6,0.8,1}" --replay-k "${KS64:-2,4}" --batch-size 64 $forced
if [[ $parts == *" b1bucket "* ]]; then
  MESHSERVE_SPEC_VERIFY_BUCKET=1 part replay_b1_bucket 200 --replay "${PS:-0.9,1}" --replay-k "${KS:-4,8}" $forced
fi
if [[ $parts == *" profile "* ]]; then  # window: steps 25-36 of each engine (plain decode, then verify steps)
  rm -rf $R/prof
  MESHSERVE_PROFILE_DIR=$R/prof MESHSERVE_PROFILE_SKIP=24 MESHSERVE_PROFILE_STEPS=12 \
    part profile_b1 150 --replay 1 --replay-k 4 $forced
  for f in $R/prof/rank0*.json; do
    [ -f "$f" ] || continue
    timeout 60 python3 tools/trace_gaps.py "$f" --top 12 > "${f%.json}.gaps" 2>&1
    echo "== trace gaps $(basename "$f") ($(head -1 "${f%.json}.txt"))"; head -30 "${f%.json}.gaps"
    rm -f "$f"  # large; the .txt and .gaps stay
  done
fi
[[ $parts == *" ngram "* ]] && part ngram_w1 120 --w1 --k 2,4 \
  --speculative-config '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
if [ "${EAGLE:-0}" = 1 ] && [ "$(left)" -gt 60 ]; then
  timeout $(($(left) - 10)) python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_gpu_eagle3.py > $R/eagle3_tests.log 2>&1
  echo "== eagle3 gpu tests rc $?: $(tail -1 $R/eagle3_tests.log)"; grep -E "^FAILED" $R/eagle3_tests.log | head -5
fi
tar czf $OUT/spec.tgz -C /tmp spec
cp $R/*.log $OUT/ 2> /dev/null
