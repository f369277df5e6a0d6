#!/usr/bin/env bash
# Issues 23/24 on one H200 in one call: the MoE kernels' GPU tests (TESTS=1), the MoE layer alone old vs new
# (tools/bench_moe.py, BENCH=1), then W1/W2 jobs each run twice, new path and MESHSERVE_MOE_LEGACY=1, back to
# back in the same session. JOBS picks jobs (unset: the two W1 jobs; "": none; W2 runs take ~1-2 min each).
# PATHS picks the paths each job runs (default "new legacy"; new routes + aligns in one launch since 2026-12-02;
# "chain": new with MESHSERVE_MOE_ROUTE_ALIGN=chain, the five launches; fold: new with MESHSERVE_MOE_FUSE_SHARED=1).
# Logs and JSON go into $OUT/moe.tgz (bench_moe.json beside), the summary lines to stdout.
#   TESTS=1 BENCH=1 JOBS="w1_qwen3moe w1_dsv2lite" OUT=$OUT bash tools/moe_device.sh
#   BENCH=1 BENCH_ARGS=--route-align-only JOBS=w2_qwen3moe PATHS="new chain" OUT=$OUT bash tools/moe_device.sh
# The shared-experts fold (issue 24): the layer at 8-2,048 tokens, then W2 on V2-Lite with and without it:
#   TESTS=1 BENCH=1 BENCH_ARGS="--models deepseek-v2-lite --paths new,fold --batches 8,64,256,2048 --no-sweep" \
#     JOBS=w2_dsv2lite PATHS="new fold" OUT=$OUT bash tools/moe_device.sh
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/moe; mkdir -p $R $OUT
MS="python3 -m meshserve.cli"

job_args() {  # NAME -> the bench arguments
  case $1 in
  w1_qwen3moe) echo "latency --model qwen3-30b-a3b" ;;
  w2_qwen3moe) echo "throughput --model qwen3-30b-a3b" ;;
  w1_dsv2lite) echo "latency --model deepseek-v2-lite" ;;
  w2_dsv2lite) echo "throughput --model deepseek-v2-lite" ;;
  *) echo "unknown job $1" >&2; return 1 ;;
  esac
}

if [ "${TESTS:-0}" = 1 ]; then
  timeout ${TEST_LIMIT:-300} python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_triton_moe_gemv.py \
    tests/kernels/test_triton_moe_routing.py tests/kernels/test_triton_moe_align.py tests/kernels/test_triton_moe.py \
    tests/kernels/test_triton_moe_route_align.py \
    tests/layers/test_fused_moe.py \
    tests/models/test_deepseek.py::test_moe_block_fast_path_matches_plain_in_a_cuda_graph_gpu > $R/tests.log 2>&1
  echo "== tests: rc $? ($(tail -1 $R/tests.log))"; grep -E "^FAILED|Error" $R/tests.log | head -8
fi
if [ "${BENCH:-0}" = 1 ]; then
  t0=$SECONDS
  timeout ${BENCH_LIMIT:-240} python3 tools/bench_moe.py --json $OUT/bench_moe.json ${BENCH_ARGS:-} > $R/bench_moe.log 2>&1
  echo "== bench_moe: rc $?, $((SECONDS - t0)) s"; grep -v -i warn $R/bench_moe.log | head -80
fi
for job in ${JOBS-w1_qwen3moe w1_dsv2lite}; do  # JOBS="" runs none
  args=$(job_args $job) || continue
  for path in ${PATHS:-new legacy}; do
    case $path in
    legacy) env_moe="MESHSERVE_MOE_LEGACY=1" ;;
    chain) env_moe="MESHSERVE_MOE_ROUTE_ALIGN=chain" ;;
    fold) env_moe="MESHSERVE_MOE_FUSE_SHARED=1" ;;
    *) env_moe="MESHSERVE_MOE_LEGACY=0" ;;
    esac
    t0=$SECONDS
    env $env_moe timeout ${LIMIT:-200} $MS bench $args --no-baseline --output-json $R/${job}_$path.json \
      > $R/${job}_$path.log 2>&1
    echo "== $job $path: rc $?, $((SECONDS - t0)) s"
    grep -v -i "warn" $R/${job}_$path.log | grep -E "tok/s|roofline|seconds|Error|error" | tail -4
  done
done
tar czf $OUT/moe.tgz -C /tmp moe
