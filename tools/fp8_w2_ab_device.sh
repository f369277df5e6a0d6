#!/usr/bin/env bash
# Issue 20's W2 A/Bs on one H200 (~8 min), after tools/fp8_w2_device.sh (the fp8 kernels' GPU tests and
# tools/bench_fp8_step.py: a W2-like decode step per kernel class, bf16 / fp8 weights / fp8 KV / both, and each
# projection as bf16 F.linear vs fp8 _scaled_mm at batch 256). The twenty-sixth session's simulator fit says the
# engine's fp8 path runs at ~0.95x bf16's FLOP rate at W2's batches (PLANNER.md); end to end:
#   2. W2 Llama-3.1-8B: bf16, then fp8 weights with a bf16 cache (the weights' share of the fp8 W2 alone);
#   3. W2 Qwen3-0.6B with an fp8 cache: convert (the default) against MESHSERVE_DECODE_FP8_PATH=auto, two rounds;
#   4. W1 Qwen3-0.6B with an fp8 cache, the same two (auto's small-batch side: words with the one tile);
# first (step 0) the fp8 decode paths' GPU tests, auto's among them.
# SKIP=0,3 skips steps by number. Results under $OUT (w2_8b_bf16/, w2_8b_fp8w/, w2_qwen_fp8kv/, w1_qwen_fp8kv/).
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p $OUT
skip() { [[ ",${SKIP:-}," == *",$1,"* ]]; }
if ! skip 0; then
  echo "== 0. the fp8 decode paths' GPU tests (auto's included)"
  timeout ${TEST_LIMIT:-150} python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_gpu_decode_fp8_path.py \
    2>&1 | tail -3
fi
run_ab() {  # name, then w1_ab_device.sh's environment
  local name=$1; shift
  env "$@" bash tools/w1_ab_device.sh 2>&1 | grep -v -i warn
  mkdir -p $OUT/$name && mv $OUT/w1_ab.tgz $OUT/$name/ 2> /dev/null
}
if ! skip 2; then
  echo "== 2. W2 Llama-3.1-8B: bf16, then fp8 weights + bf16 cache"
  run_ab w2_8b_bf16 BENCH=throughput BENCH_ARGS="--repeat 2" JOBS="8b:default" REPEAT=1 BUDGET=150 LIMIT=170
  run_ab w2_8b_fp8w BENCH=throughput BENCH_ARGS="--repeat 2 --quantization fp8" JOBS="8b:default" REPEAT=1 \
    BUDGET=150 LIMIT=170
fi
if ! skip 3; then
  echo "== 3. W2 Qwen3-0.6B, fp8 cache: convert vs auto"
  run_ab w2_qwen_fp8kv BENCH=throughput BENCH_ARGS="--repeat 2 --kv-cache-dtype fp8" \
    JOBS="qwen:default qwen:DECODE_FP8_PATH=auto" REPEAT=2 BUDGET=200
fi
if ! skip 4; then
  echo "== 4. W1 Qwen3-0.6B, fp8 cache: convert vs auto"
  run_ab w1_qwen_fp8kv BENCH=latency BENCH_ARGS="--kv-cache-dtype fp8" JOBS="qwen:default qwen:DECODE_FP8_PATH=auto" \
    REPEAT=2 BUDGET=150
fi
