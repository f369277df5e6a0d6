#!/usr/bin/env bash
# Issue 24 (DeepSeek-V2-Lite W2) on one H200, each call under DEADLINE seconds (default 460). PARTS, in order
# (default "tests w2 w1 mla", ~7.5 min; then a second call PARTS="moe variants", ~4 min):
#   tests     the GPU tests (-v) of the MLA decode kernels (the by-shape default, the prefetching and transposed
#             loops) and of the MoE tile tables
#   w2 w1     W2 and W1 with the new defaults (--no-baseline)
#   mla       tools/bench_mla_decode.py: the model's step, the kernel sweep, the layer (paths legacy / split /
#             balanced / auto / auto+prefetch / auto+transposed)
#   moe       tools/bench_moe.py at V2-Lite's shapes (layer: legacy / new / stream; sweep: tables and candidates)
#   variants  W2 with MESHSERVE_MLA_PREFETCH=1, MESHSERVE_MLA_TRANSPOSED=1, MESHSERVE_MOE_CONFIGS=stream
#   w2pair    W2 V2-Lite with ON_ENV (default: the pipelined MLA loop everywhere, the shared-experts fold) then
#             with OFF_ENV (default: the plain MLA loop, no fold), back to back; w2qpair: W2 Qwen3-30B-A3B with MESHSERVE_MOE_ROUTE_ALIGN=fused then chain
# MLA_ONLY (default model,sweep,layer) and MLA_SHAPES (e.g. 256x800,256xw2mix) pick bench_mla_decode's parts; MOE_MODELS / MOE_PATHS / MOE_BATCHES /
# MOE_ARGS bench_moe's (default V2-Lite, its own default paths and batches, the sweep on)
# Every log and JSON lands in $OUT; summary lines on stdout. A part starts only with 40 s left.
#   OUT=$OUT bash tools/mla_moe_device.sh
#   PARTS="moe variants" OUT=$OUT bash tools/mla_moe_device.sh     (the second call)
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"
MS="python3 -m meshserve.cli"
DEADLINE=${DEADLINE:-460}
PARTS=${PARTS:-tests w2 w1 mla}
left() {  # LIMIT -> the seconds a part may take: LIMIT, or what is left before DEADLINE (at least 1)
  local rest=$((DEADLINE - SECONDS))
  [ $rest -lt 1 ] && rest=1
  [ "$1" -lt $rest ] && echo "$1" || echo $rest
}
time_left() { [ $((DEADLINE - SECONDS)) -ge 40 ] || { echo "== $1: skipped (time)"; return 1; }; }

run_bench() {  # NAME LIMIT ENV -- ARGS: one bench run and its summary lines
  local name=$1 limit=$2 env_var=$3; shift 4
  time_left $name || return
  local t=$SECONDS
  env $env_var timeout $(left $limit) $MS bench "$@" --no-baseline --output-json $OUT/$name.json > $OUT/$name.log 2>&1
  echo "== $name: rc $?, $((SECONDS - t)) s"
  grep -v -i warn $OUT/$name.log | grep -E "^(seconds|output_tok_s|tok_s|decode_tok_s|pct_roofline)|Error|error" | tail -5
}

part_tests() {
  time_left tests || return
  local t=$SECONDS
  timeout $(left 160) python3 -m pytest -m gpu -v -p no:cacheprovider tests/kernels/test_mla.py \
    tests/kernels/test_mla_balanced.py tests/kernels/test_mla_pipelined.py tests/kernels/test_triton_moe_align.py \
    tests/kernels/test_triton_moe_route_align.py tests/kernels/test_triton_moe.py tests/layers/test_fused_moe.py \
    tests/models/test_deepseek.py::test_moe_block_fast_path_matches_plain_in_a_cuda_graph_gpu \
    tests/models/test_deepseek.py::test_mla_decode_paths_agree_at_v2_lite_shapes_in_a_cuda_graph > $OUT/tests.log 2>&1
  echo "== tests: rc $?, $((SECONDS - t)) s ($(tail -1 $OUT/tests.log))"
  grep -E "^FAILED|^ERROR" $OUT/tests.log | head -10
}

part_mla() {  # the model's step first, then the kernel sweep, then the layer: a timeout keeps the parts done
  time_left mla || return
  local t=$SECONDS
  # shellcheck disable=SC2086
  timeout $(left 170) python3 tools/bench_mla_decode.py --only ${MLA_ONLY:-model,sweep,layer} ${MLA_SHAPES:+--shapes $MLA_SHAPES} --json $OUT/bench_mla_decode.json \
    > $OUT/bench_mla_decode.log 2>&1
  echo "== bench_mla_decode: rc $?, $((SECONDS - t)) s"
  grep -E "^(layer|sweep|model b)|Error" $OUT/bench_mla_decode.log | head -50
}

part_moe() {
  time_left moe || return
  local t=$SECONDS
  # shellcheck disable=SC2086
  timeout $(left 80) python3 tools/bench_moe.py --models ${MOE_MODELS:-deepseek-v2-lite} --json $OUT/bench_moe.json \
    ${MOE_PATHS:+--paths $MOE_PATHS} ${MOE_BATCHES:+--batches $MOE_BATCHES} ${MOE_ARGS:-} > $OUT/bench_moe.log 2>&1
  echo "== bench_moe: rc $?, $((SECONDS - t)) s"
  grep -v -i warn $OUT/bench_moe.log | grep -E "^ +[0-9]+ |speedup|copy|Error" | head -80
}

echo "== $(nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null | head -1); parts: $PARTS"
for part in $PARTS; do
  case $part in
  tests) part_tests ;;
  w2) run_bench w2_dsv2lite 100 MESHSERVE_MLA_PREFETCH=0 -- throughput --model deepseek-v2-lite ;;
  w1) run_bench w1_dsv2lite 100 MESHSERVE_MLA_PREFETCH=0 -- latency --model deepseek-v2-lite ;;
  mla) part_mla ;;
  moe) part_moe ;;
  variants)
    run_bench w2_dsv2lite_prefetch 80 MESHSERVE_MLA_PREFETCH=1 -- throughput --model deepseek-v2-lite
    run_bench w2_dsv2lite_transposed 80 MESHSERVE_MLA_TRANSPOSED=1 -- throughput --model deepseek-v2-lite
    run_bench w2_dsv2lite_moe_stream 80 MESHSERVE_MOE_CONFIGS=stream -- throughput --model deepseek-v2-lite ;;
  w2pair)
    run_bench w2_dsv2lite_on 90 "${ON_ENV:-MESHSERVE_MLA_DECODE_KERNEL=pipelined MESHSERVE_MOE_FUSE_SHARED=1}" -- \
      throughput --model deepseek-v2-lite
    run_bench w2_dsv2lite_off 90 "${OFF_ENV:-MESHSERVE_MLA_DECODE_KERNEL=default MESHSERVE_MOE_FUSE_SHARED=0}" -- \
      throughput --model deepseek-v2-lite ;;
  w2qpair)
    run_bench w2_qwen3moe_fused 90 MESHSERVE_MOE_ROUTE_ALIGN=fused -- throughput --model qwen3-30b-a3b
    run_bench w2_qwen3moe_chain 90 MESHSERVE_MOE_ROUTE_ALIGN=chain -- throughput --model qwen3-30b-a3b ;;
  *) echo "== unknown part $part" ;;
  esac
done
echo "== total $SECONDS s"
