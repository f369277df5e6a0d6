#!/usr/bin/env bash
# Issue 22 on one H200 in one call: speculative decoding's mechanism on Llama-3.1-8B (dummy weights, bf16, CUDA
# graphs), `meshserve bench spec`:
#   1. --replay: batch 1, tok/s against controlled acceptance P for k = 2, 4, 8, beside no speculation;
#   2. --replay at batch 64 (the large-batch cost, goal >= 0.97x);
#   3. --w1 with the n-gram proposer (W1's token-id prompt: the dummy model's own repetitive continuation);
#   4. EAGLE-3's GPU tests and W1 with a random head (what a draft step costs), where EAGLE=1.
# Each part stops starting past BUDGET seconds (default 540). JSON and logs: $OUT/spec.tgz; summary to stdout.
# Usage (device, repo root, carry .whl):
#   [MODEL=llama-3.1-8b] [PARTS="b1 b64 ngram"] [PS=0,...] [KS=2,4,8] [FORCED=1] [EAGLE=1] bash tools/spec_device.sh
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
parts=" ${PARTS:-b1 b64 ngram} "
[[ $parts == *" b1 "* ]] && part replay_b1 300 --replay "${PS:-0,0.3,0.5,0.6,0.7,0.8,0.9,1}" --replay-k "${KS:-2,4,8}" $forced
[[ $parts == *" b64 "* ]] && part replay_b64 150 --replay "${PS64:-0.6,0.8,1}" --replay-k "${KS64:-2,4}" --batch-size 64 $forced
[[ $parts == *" ngram "* ]] && part ngram_w1 120 --w1 --k 2,4 \
  --speculative-config '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
if [ "${EAGLE:-0}" = 1 ] && [ "$(left)" -gt 60 ]; then
  timeout $(($(left) - 10)) python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_gpu_eagle3.py > $R/eagle3_tests.log 2>&1
  echo "== eagle3 gpu tests rc $?: $(tail -1 $R/eagle3_tests.log)"; grep -E "^FAILED" $R/eagle3_tests.log | head -5
fi
tar czf $OUT/spec.tgz -C /tmp spec
