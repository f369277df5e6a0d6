#!/usr/bin/env bash
# Issue 20 on one H200 (branch fp8-w2): the GPU tests of the fp8 kernels this branch changed, then
# tools/bench_fp8_step.py (decode step per kernel class, bf16 / fp8 weights / fp8 KV / both, old paths beside).
# SKIP_TESTS=1 runs only the harness. Logs and JSON go into $OUT/fp8_w2.tgz, summary lines to stdout (~5 min).
# W2 itself: JOBS="w2_8b_bf16 w2_8b_fp8_fp8kv w2_qwen_bf16 w2_qwen_fp8kv" bash tools/quant_moe_device.sh
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/fp8_w2; mkdir -p $R $OUT
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout ${TEST_LIMIT:-300} python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_triton_fp8_quant.py \
    tests/kernels/test_triton_fp8_fused.py tests/kernels/test_fp8_kv_cache.py "tests/kernels/test_triton_ops.py::test_qkv_rope_cache_fp8_gpu" \
    tests/kernels/test_quant_kernels.py tests/gpu/test_gpu_engine.py -k "fp8 or scaled_mm or per_token or fused or decode" \
    > $R/tests.log 2>&1
  echo "== tests: rc $? ($(tail -1 $R/tests.log))"; grep -E "^FAILED|Error" $R/tests.log | head -8
fi
timeout ${BENCH_LIMIT:-240} python3 tools/bench_fp8_step.py --json $R/fp8_step.json > $R/bench.log 2>&1
echo "== bench_fp8_step: rc $?"; grep -vE "Warning|warn" $R/bench.log | tail -70
tar czf $OUT/fp8_w2.tgz -C /tmp fp8_w2
