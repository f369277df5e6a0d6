#!/usr/bin/env bash
# The GPU tests of the features merged on 2026-11-30 (quantization, speculative decoding, MoE, MLA, KV offload,
# disaggregation, structured outputs), in one device call on nvidia-h200 (or -x2 for the two-GPU cases).
# Each group runs under its own time limit; every log goes into one archive, $OUT/gpu_tests.tgz (a device
# call brings back at most 8 files), and the summary lines are printed.
#   PART=kernels   the Triton kernels against their torch references (fast; run this first)
#   PART=engine    engine-level GPU tests (spec decode, KV offload, MoE, structured, disagg on one GPU)
#   PART=new       what 2026-11-30's third session added and could not run on a GPU: the mixed-step graphs'
#                  two-batch test, speculation through them, the norm-in-GEMV fold and short decode graphs,
#                  block FP8, the MLA prefill path and layer-wise KV transfer
#   PART=mla       the MLA decode path of branch mla-w2: fused prologue, balanced kernel, the three decode paths
#                  of DeepSeek-V2-Lite's attention in a CUDA graph
#   PART=all       kernels and engine
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
LOGS=/tmp/gpu_test_logs
mkdir -p "$LOGS"

run_group() {  # NAME LIMIT_S TEST_PATHS...
  local name=$1 limit=$2; shift 2
  timeout -s INT -k 20 "$limit" python3 -m pytest -m gpu -q -rfE -p no:cacheprovider "$@" > "$LOGS/$name.log" 2>&1
  echo "== $name: rc $? ($(tail -1 "$LOGS/$name.log"))"
}

case "${PART:-all}" in
kernels|all)
  run_group quant_kernels 240 tests/kernels/test_quant_kernels.py tests/kernels/test_fp8_kv_cache.py
  run_group moe_mla_kernels 240 tests/kernels/test_triton_moe.py tests/kernels/test_mla.py
  ;;&
engine|all)
  run_group spec_decode 300 tests/gpu/test_gpu_spec_decode.py tests/gpu/test_gpu_spec_async.py
  run_group kv_offload 240 tests/gpu/test_gpu_kv_offload.py tests/engine/kv_offload/test_kv_transfer.py
  run_group moe_engine 300 tests/gpu/test_gpu_moe.py
  run_group structured 180 tests/engine/test_structured_engine.py
  run_group disagg 240 tests/disagg/test_disagg_gpu.py
  ;;
new)
  run_group mixed_spec 300 tests/gpu/test_mixed_graphs.py tests/gpu/test_gpu_spec_decode.py
  run_group decode_fixed 240 tests/kernels/test_triton_gemv.py tests/gpu/test_decode_fixed_cost.py
  run_group pdl 300 tests/kernels/test_pdl.py tests/gpu/test_pdl_decode.py
  run_group fp8_block 180 tests/kernels/test_fp8_block_kernels.py
  run_group moe_fp8 300 tests/kernels/test_triton_moe.py -k fp8
  run_group mla_prefill 300 tests/kernels/test_mla_prefill.py tests/layers/test_mla_attention.py tests/kernels/test_mla.py tests/kernels/test_lse_merge.py
  run_group moe_engine 300 tests/gpu/test_gpu_moe.py
  run_group structured_disagg 300 tests/engine/test_structured_engine.py tests/disagg
  ;;
mla)
  run_group mla_decode 300 tests/kernels/test_mla_rope.py tests/kernels/test_mla_balanced.py tests/kernels/test_mla.py \
    tests/models/test_deepseek.py tests/layers/test_mla_attention.py
  ;;
esac
tar czf "$OUT/gpu_tests.tgz" -C /tmp gpu_test_logs
