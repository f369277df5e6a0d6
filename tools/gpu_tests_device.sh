#!/usr/bin/env bash
# `pytest -m gpu` on the device under a time limit that still reports: the limit sends SIGINT (pytest stops at the
# running test and prints its summary, failures included; -k: killed 20 s later if it hangs), where a plain
# `timeout` kills pytest before its summary (the thirty-seventh session lost two calls' failure messages so).
#   LIMIT=280 bash tools/gpu_tests_device.sh tests/gpu/test_no_late_jit.py -k llama
# The whole log: $OUT/gpu_tests.log; printed: the failures' summary lines and the last line.
#
# PARALLEL=N (kernel tests: tests/kernels/ and other files that launch no engine process) runs them in N
# pytest-xdist workers (the device image has it), then the failures again one by one in this process's
# remaining LIMIT ($OUT/gpu_tests_rerun.log): what fails alone too is a real failure. Triton compiles dominate
# the kernel tests (serially ~100 of them in 326 s on an H100); `-n 12` ran all 853 in 168 s, but 12 workers on
# one 80 GB card ran 22 large-shape tests out of memory (8k prefills, the 128,256-row LM head, MoE experts at
# model shapes; those rerun alone passed); on an H200 (141 GB) 832 ran in 131 s, none out of memory (the 2 that
# failed beside others passed alone). tests/gpu/ starts engines with a share of the card's memory: never PARALLEL
# there.
#   PARALLEL=12 LIMIT=400 bash tools/gpu_tests_device.sh tests/kernels/
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"
limit=${LIMIT:-280}
start=$SECONDS
opts=()
if [ -n "${PARALLEL:-}" ]; then  # the parallel run's failures are read back from pytest's own cache (--lf)
  rm -rf /tmp/gpu_tests_cache
  opts=(-n "$PARALLEL" --dist load -o cache_dir=/tmp/gpu_tests_cache)
else
  opts=(-p no:cacheprovider)
fi
timeout -s INT -k 20 "$limit" python3 -m pytest -m gpu -q -rfE --tb=short "${opts[@]}" "$@" > "$OUT/gpu_tests.log" 2>&1
rc=$?
if [ -n "${PARALLEL:-}" ] && [ $rc -eq 1 ]; then
  echo "== parallel: $(tail -1 "$OUT/gpu_tests.log"); its failures rerun one by one"
  left=$((limit - (SECONDS - start)))
  if [ $left -gt 30 ]; then
    timeout -s INT -k 20 "$left" python3 -m pytest -m gpu -q -rfE --tb=short -o cache_dir=/tmp/gpu_tests_cache \
      --lf --lfnf none "$@" > "$OUT/gpu_tests_rerun.log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR) |^E  " "$OUT/gpu_tests_rerun.log" | head -60
    echo "== rc $rc (rerun alone): $(tail -1 "$OUT/gpu_tests_rerun.log")"
    exit $rc
  fi
fi
grep -E "^(FAILED|ERROR) |^E  " "$OUT/gpu_tests.log" | head -60
echo "== rc $rc: $(tail -1 "$OUT/gpu_tests.log")"
exit $rc
