#!/usr/bin/env bash
# Issue 24 (DeepSeek-V2-Lite W2) on one H200 in one call, under DEADLINE seconds (default 460): the GPU tests
# of the MLA decode kernels (the by-shape default, the prefetching loop) and of the MoE tile tables; the MLA
# decode bench (tools/bench_mla_decode.py: paths legacy / split / balanced / auto / auto+prefetch, the tile
# sweep, the model's step); the MoE bench at V2-Lite's shapes (tools/bench_moe.py: tuned vs stream vs
# candidates); then W2 and W1 with the new defaults (--no-baseline), and W2 again with MESHSERVE_MLA_PREFETCH=1,
# MESHSERVE_MLA_TRANSPOSED=1 and MESHSERVE_MOE_CONFIGS=stream while time is left (DEADLINE=600 for all). Every log and JSON lands in $OUT; summary lines
# on stdout.
#   OUT=$OUT bash tools/mla_moe_device.sh
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"
MS="python3 -m meshserve.cli"
DEADLINE=${DEADLINE:-460}
left() {  # LIMIT -> the seconds a part may take: LIMIT, or what is left before DEADLINE (at least 1)
  local rest=$((DEADLINE - SECONDS))
  [ $rest -lt 1 ] && rest=1
  [ "$1" -lt $rest ] && echo "$1" || echo $rest
}
echo "== $(nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null | head -1)"

t0=$SECONDS
timeout $(left 120) python3 -m pytest -m gpu -v -p no:cacheprovider tests/kernels/test_mla.py \
  tests/kernels/test_mla_balanced.py tests/kernels/test_triton_moe_align.py \
  tests/models/test_deepseek.py::test_mla_decode_paths_agree_at_v2_lite_shapes_in_a_cuda_graph > $OUT/tests.log 2>&1
echo "== tests: rc $?, $((SECONDS - t0)) s ($(tail -1 $OUT/tests.log))"
grep -E "^FAILED|^ERROR" $OUT/tests.log | head -10

t0=$SECONDS
# the model's step first (the W2 numbers), then the kernel sweep, then the layer: a timeout keeps the parts done
timeout $(left 190) python3 tools/bench_mla_decode.py --only model,sweep,layer --json $OUT/bench_mla_decode.json \
  > $OUT/bench_mla_decode.log 2>&1
echo "== bench_mla_decode: rc $?, $((SECONDS - t0)) s"
grep -E "^(layer|sweep|model)|Error" $OUT/bench_mla_decode.log | grep -v "^model loaded" | head -40

t0=$SECONDS
timeout $(left 80) python3 tools/bench_moe.py --models deepseek-v2-lite --json $OUT/bench_moe.json > $OUT/bench_moe.log 2>&1
echo "== bench_moe: rc $?, $((SECONDS - t0)) s"
grep -v -i warn $OUT/bench_moe.log | grep -E "^ +(1|8|16|32|64|128|256) |speedup|copy|Error" | head -70

run_bench() {  # NAME LIMIT ENV... -- ARGS: one bench run, its summary lines
  local name=$1 limit=$2; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  if [ $((DEADLINE - SECONDS)) -lt 40 ]; then echo "== $name: skipped (time)"; return; fi
  local t=$SECONDS
  env "${envs[@]}" timeout $(left $limit) $MS bench "$@" --no-baseline --output-json $OUT/$name.json \
    > $OUT/$name.log 2>&1
  echo "== $name: rc $?, $((SECONDS - t)) s"
  grep -v -i warn $OUT/$name.log | grep -E "^(seconds|output_tok_s|tok_s|decode_tok_s|pct_roofline)|Error|error" | tail -5
}
run_bench w2_dsv2lite 100 MESHSERVE_MLA_PREFETCH=0 -- throughput --model deepseek-v2-lite
run_bench w1_dsv2lite 100 MESHSERVE_MLA_PREFETCH=0 -- latency --model deepseek-v2-lite
run_bench w2_dsv2lite_prefetch 80 MESHSERVE_MLA_PREFETCH=1 -- throughput --model deepseek-v2-lite
run_bench w2_dsv2lite_transposed 80 MESHSERVE_MLA_TRANSPOSED=1 -- throughput --model deepseek-v2-lite
run_bench w2_dsv2lite_moe_stream 80 MESHSERVE_MOE_CONFIGS=stream -- throughput --model deepseek-v2-lite
echo "== total $SECONDS s"
