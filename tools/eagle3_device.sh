#!/usr/bin/env bash
# EAGLE-3 on one H200: the GPU tests (tests/gpu/test_gpu_eagle3.py), then W1 at batch 1 on Llama-3.1-8B (dummy
# weights, bf16, CUDA graphs) without speculation and then with a random-weight EAGLE-3 head in the public layout
# (draft vocab 32000) for each k in KS. Random heads are accepted ~never: the rows give what a draft step costs
# (draft_ms: one proposal, k head forwards) and whether the tokens stay those of no speculation (bf16: a verify
# step's other kernel shapes may flip a near-tie; --dtype float32 for the exact check).
# Usage (device, repo root), one call each (10 min per call):
#   BENCH=0 bash tools/eagle3_device.sh          # the GPU tests only
#   TESTS=0 [KS=1,3] bash tools/eagle3_device.sh # the W1 rows only ($OUT/eagle3_w1.json)
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p $OUT
if [ "${TESTS:-1}" = 1 ]; then
  timeout 400 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_gpu_eagle3.py > $OUT/eagle3_gpu_tests.log 2>&1
  echo "== gpu tests rc $?: $(tail -1 $OUT/eagle3_gpu_tests.log)"; grep -E "^FAILED|Error" $OUT/eagle3_gpu_tests.log | head -8
fi
[ "${BENCH:-1}" = 1 ] || exit 0
python3 -m meshserve.spec_decode.eagle3_random_head /tmp/eagle3-8b --target llama-3.1-8b --draft-vocab 32000 || exit 1
timeout 500 python3 -m meshserve.cli bench spec --model llama-3.1-8b --w1 --k "${KS:-1,3}" --max-tokens 256 \
  --dtype bfloat16 --output-json $OUT/eagle3_w1.json \
  --speculative-config '{"method": "eagle3", "model": "/tmp/eagle3-8b", "num_speculative_tokens": 3}' 2>&1 | tail -5
