#!/usr/bin/env bash
# The balanced GQA decode kernel (kernels/triton_decode_balanced.py, MESHSERVE_DECODE_BALANCED) on the device in
# one call: its GPU tests, the kernel against the split kernel at W2's batch (tools/bench_decode_balanced.py),
# then W2 A/Bs through tools/w1_ab_device.sh (two processes a setting, interleaved), each part under its limit.
#   PER_SM=4,6 bash tools/balanced_device.sh          (carry .whl; ~550 s with the defaults)
# Parts: SKIP_TESTS=1, SKIP_KERNEL=1 skip; W2="8b-fp8 qwen-fp8kv" (any of 8b-fp8, qwen-fp8kv, 8b, qwen) picks
# the W2 pairs, each "default" against DECODE_BALANCED=$W2_PER_SM (default 6).
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"
if [ -z "${SKIP_TESTS:-}" ]; then
  (OUT=$OUT/tests LIMIT=${TEST_LIMIT:-170} bash tools/gpu_tests_device.sh tests/kernels/test_triton_decode_balanced.py \
    tests/gpu/test_gpu_engine.py -k "balanced")
fi
if [ -z "${SKIP_KERNEL:-}" ]; then
  timeout -k 10 "${KERNEL_LIMIT:-120}" python3 tools/bench_decode_balanced.py --per-sm "${PER_SM:-4,6}" \
    --json "$OUT/kernel.json" 2>&1 | grep -v -i warn
fi
n=${W2_PER_SM:-6}
for pair in ${W2:-8b-fp8 qwen-fp8kv}; do
  case $pair in
    8b-fp8) m=8b args="--quantization fp8 --kv-cache-dtype fp8" ;;
    qwen-fp8kv) m=qwen args="--kv-cache-dtype fp8" ;;
    8b|qwen) m=$pair args="" ;;
    *) echo "W2 pair $pair: one of 8b-fp8, qwen-fp8kv, 8b, qwen"; exit 1 ;;
  esac
  (OUT=$OUT/w2_$pair JOBS="$m:default $m:DECODE_BALANCED=$n" REPEAT=2 BUDGET=${W2_BUDGET:-150} BENCH=throughput \
    BENCH_ARGS="$args" bash tools/w1_ab_device.sh 2>&1 | tail -4)
done
