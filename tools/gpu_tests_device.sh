#!/usr/bin/env bash
# `pytest -m gpu` on the device under a time limit that still reports: the limit sends SIGINT (pytest stops at the
# running test and prints its summary, failures included; -k: killed 20 s later if it hangs), where a plain
# `timeout` kills pytest before its summary (the thirty-seventh session lost two calls' failure messages so).
#   LIMIT=280 bash tools/gpu_tests_device.sh tests/gpu/test_no_late_jit.py -k llama
# The whole log: $OUT/gpu_tests.log; printed: the failures' summary lines and the last line.
# The kernel tests in parallel (pytest-xdist is in the device image): `-n 12 --dist load tests/kernels/` ran 853
# of them in 168 s on an H100 (serially ~100 in 326 s: Triton compiles dominate), but 12 workers on one 80 GB
# card ran 22 of the large-shape tests out of memory (8k prefills, the 128,256-row LM head, MoE experts at
# model shapes): rerun the failures serially, or use fewer workers.
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"
timeout -s INT -k 20 "${LIMIT:-280}" python3 -m pytest -m gpu -q -rfE --tb=short -p no:cacheprovider "$@" \
  > "$OUT/gpu_tests.log" 2>&1
rc=$?
grep -E "^(FAILED|ERROR) |^E  " "$OUT/gpu_tests.log" | head -60
echo "== rc $rc: $(tail -1 "$OUT/gpu_tests.log")"
