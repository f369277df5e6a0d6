#!/usr/bin/env bash
# The fp8 decode tile paths on one H200 (branch fp8decode; MESHSERVE_DECODE_FP8_PATH=convert|words): the GPU
# tests of the words path (all 256 bytes bit-exact through the PTX conversion; decode equal to convert), then
# tools/sweep_decode_attention.py --fp8-ab (convert vs words at one split, the three shapes measured on
# 2026-12-03, seven tiles, bf16 beside). SKIP_TESTS=1 runs only the sweep. Logs and JSON in $OUT/fp8_decode_path.tgz, summary lines to stdout (~5-8 min, most of it JIT).
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/fp8_decode_path; mkdir -p $R $OUT
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout ${TEST_LIMIT:-300} python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/gpu/test_gpu_decode_fp8_path.py \
    > $R/tests.log 2>&1
  echo "== tests: rc $? ($(tail -1 $R/tests.log))"; grep -E "^FAILED|Error|bit-equal" $R/tests.log | head -40
fi
timeout ${BENCH_LIMIT:-300} python3 tools/sweep_decode_attention.py --fp8-ab > $R/sweep.log 2>&1
echo "== sweep --fp8-ab: rc $?"; grep -vE "Warning|warn|^JSON" $R/sweep.log | tail -40
tar czf $OUT/fp8_decode_path.tgz -C /tmp fp8_decode_path
