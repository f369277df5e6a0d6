#!/usr/bin/env bash
# EAGLE-3 on one H200: the GPU tests (tests/gpu/test_gpu_eagle3.py), then W1 at batch 1 on Llama-3.1-8B (dummy
# weights, bf16, CUDA graphs) without and with a random-weight EAGLE-3 head in the public layout (draft vocab
# 32000), for each k in KS. Random heads are accepted ~never: the rows measure what a draft step costs and that
# the tokens stay those of no speculation. Usage (device, repo root): [KS="1 3"] [TESTS=1] bash tools/eagle3_device.sh
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p $OUT
if [ "${TESTS:-1}" = 1 ]; then
  timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_gpu_eagle3.py > $OUT/eagle3_gpu_tests.log 2>&1
  echo "== gpu tests rc $?: $(tail -1 $OUT/eagle3_gpu_tests.log)"; grep -E "^FAILED|Error" $OUT/eagle3_gpu_tests.log | head -8
fi
python3 -m meshserve.spec_decode.eagle3_random_head /tmp/eagle3-8b --target llama-3.1-8b --draft-vocab 32000 || exit 1
for k in ${KS:-1 3}; do
  timeout 280 python3 -m meshserve.cli bench spec --model llama-3.1-8b --w1 --max-tokens 256 --dtype bfloat16 \
    --speculative-config "{\"method\": \"eagle3\", \"model\": \"/tmp/eagle3-8b\", \"num_speculative_tokens\": $k}" \
    --output-json $OUT/eagle3_w1_k$k.json 2>&1 | tail -4
done
