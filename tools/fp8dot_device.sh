#!/usr/bin/env bash
# Issue 20's fp8dot decode path (MESHSERVE_DECODE_FP8_PATH=fp8dot, kernels/triton_e4m3_dot.py: e4m3 wgmmas on the
# fp8 cache's tiles, no conversion) on one H200, ~7-8 min:
#   1. its GPU tests (tests/gpu/test_gpu_decode_fp8_path.py -k fp8dot: the PTX transpose against its byte
#      spelling and the torch reference, near convert over the models' shapes, the fused launch, the grid tile,
#      Qwen3-0.6B's greedy tokens against convert's up to a near-tie; Llama-3.1-8B's engine test left out for
#      time: TESTS_K="fp8dot" runs it too);
#   2. the decode attention micro-benchmark (tools/bench_fp8_step.py --attention-only: batch 256 x ctx 800, one
#      split, bf16 / fp8 convert / fp8 fp8dot, the tile sweep at Qwen3-0.6B's heads);
#   3. W2 Qwen3-0.6B with an fp8 cache: convert (the default) against fp8dot, two rounds (tools/w1_ab_device.sh).
# SKIP=1,3 skips steps by number. Results under $OUT: fp8dot.tgz (test and bench logs, the bench's JSON) and
# w2_qwen_fp8dot/w1_ab.tgz.
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/fp8dot; rm -rf $R; mkdir -p $R $OUT
skip() { [[ ",${SKIP:-}," == *",$1,"* ]]; }
if ! skip 1; then
  timeout ${TEST_LIMIT:-240} python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/gpu/test_gpu_decode_fp8_path.py \
    -k "${TESTS_K:-fp8dot and not (near_tie and llama)}" > $R/tests.log 2>&1
  echo "== 1. fp8dot GPU tests: rc $? ($(tail -1 $R/tests.log))"
  grep -E "^FAILED|Error|bit-equal|ref\| max|divergence" $R/tests.log | head -60
fi
if ! skip 2; then
  timeout ${BENCH_LIMIT:-120} python3 tools/bench_fp8_step.py --attention-only --json $R/attention.json \
    > $R/bench.log 2>&1
  echo "== 2. decode attention, batch 256 x ctx 800, one split: rc $?"; grep -E "heads|total" $R/bench.log
fi
tar czf $OUT/fp8dot.tgz -C /tmp fp8dot
if ! skip 3; then
  echo "== 3. W2 Qwen3-0.6B, fp8 cache: convert vs fp8dot"
  BENCH=throughput BENCH_ARGS="--repeat 2 --kv-cache-dtype fp8" JOBS="qwen:default qwen:DECODE_FP8_PATH=fp8dot" \
    REPEAT=2 BUDGET=${W2_BUDGET:-170} bash tools/w1_ab_device.sh 2>&1 | grep -v -i warn
  mkdir -p $OUT/w2_qwen_fp8dot && mv $OUT/w1_ab.tgz $OUT/w2_qwen_fp8dot/ 2> /dev/null
fi
