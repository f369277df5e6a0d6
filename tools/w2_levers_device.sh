#!/usr/bin/env bash
# The open W2 levers of issues 20 and 29 on the device (the balanced GQA decode kernel, MESHSERVE_DECODE_BALANCED,
# kernels/triton_decode_balanced.py; the Triton decode GEMMs, kernels/triton_decode_gemm.py: fp8 with rowwise
# scales, MESHSERVE_FP8_GEMM=triton, and 16-bit with PDL, MESHSERVE_DECODE_GEMM=1), in parts that fit one call
# each (carry .whl):
#   PARTS="tests kernels" bash tools/w2_levers_device.sh      (~480 s: their GPU tests, then each kernel timed
#                                                             against what it would replace at W2's shapes)
#   PARTS=w2 bash tools/w2_levers_device.sh                   (~450 s: W2 A/Bs, two processes a setting)
#   PARTS=jit | PARTS=curve | PARTS=moe ...                    (a call each, ~300-400 s: test_no_late_jit with the
#                                                             balanced default; the 8B fp8 latency curve with
#                                                             MESHSERVE_FP8_GEMM=auto; W2 Qwen3-30B-A3B with and
#                                                             without the balanced kernel)
#   PARTS=trace ...                                           (~150 s: W2 step traces, Qwen3-0.6B and the 8B, bf16,
#                                                             for the simulator's refit)
#   PARTS=layer, then PARTS=layer_engine                     (<= 200 s, <= 560 s; issue 29's W1: the one-launch layer,
#                                                             MESHSERVE_DECODE_LAYER, kernels/triton_decode_layer.py:
#                                                             its GPU tests under short limits (a barrier that never
#                                                             opens hangs)); then PARTS=layer_w1 (~330 s: W1 Qwen3-0.6B
#                                                             default / one launch a layer at 8 or 4 warps, 32 or 64
#                                                             values a thread a trip / one launch a phase, two
#                                                             processes each); PARTS=layer_moe: W1
#                                                             Qwen3-30B-A3B default / one launch a layer (~300 s);
#                                                             PARTS=layer_8b: W1 Llama-3.1-8B bf16, fp8 and AWQ INT4
#                                                             weights (`--quantization fp8|awq`: the kernel's words and
#                                                             INT4 paths, issue 20), default / one launch a layer
#                                                             streaming 32 (/ 64) values a thread a trip (~400 s);
#                                                             PARTS=layer_phases: tools/decode_layer_phases.py (each
#                                                             phase's and barrier's time from the kernel's clocks,
#                                                             Qwen / 8B bf16, fp8, INT4 / 30B-A3B; ~300 s)
# W2 pairs: W2="8b-fp8 qwen-fp8kv" (default; also 8b, qwen: bf16), each model's default against the settings in
# W2_8B, W2_QWEN or W2_BF16 (default each "DECODE_BALANCED=0": the split kernel, the default before the thirty-ninth
# session; e.g. W2_8B="FP8_GEMM=triton DECODE_BALANCED=5"); PER_SM: the kernel timing's programs an SM (default
# 4,5,6), CAPS its register caps (default "rule": tools/bench_decode_balanced.py --caps); *_LIMIT: each part's
# seconds.
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"
for part in ${PARTS:-tests kernels}; do
  case $part in
    tests)
      (OUT=$OUT/tests LIMIT=${TEST_LIMIT:-260} bash tools/gpu_tests_device.sh tests/kernels/test_triton_decode_balanced.py \
        tests/kernels/test_triton_decode_gemm.py tests/gpu/test_gpu_engine.py -k "balanced or gemm") ;;
    kernels)
      timeout -k 10 "${KERNEL_LIMIT:-100}" python3 tools/bench_decode_balanced.py --per-sm "${PER_SM:-4,5,6}" \
        --caps "${CAPS:-rule}" --json "$OUT/balanced.json" 2>&1 | grep -v -i warn
      timeout -k 10 "${GEMM_LIMIT:-90}" python3 tools/bench_decode_gemm.py --m 16,128,256,512 --json "$OUT/gemm.json" \
        2>&1 | grep -v -i warn ;;
    w2)
      for pair in ${W2:-8b-fp8 qwen-fp8kv}; do
        case $pair in
          8b-fp8) m=8b args="--quantization fp8 --kv-cache-dtype fp8" sets=${W2_8B:-DECODE_BALANCED=0} ;;
          qwen-fp8kv) m=qwen args="--kv-cache-dtype fp8" sets=${W2_QWEN:-DECODE_BALANCED=0} ;;
          8b|qwen) m=$pair args="" sets=${W2_BF16:-DECODE_BALANCED=0} ;;
          *) echo "W2 pair $pair: one of 8b-fp8, qwen-fp8kv, 8b, qwen"; exit 1 ;;
        esac
        jobs="$m:default"
        for s in $sets; do jobs="$jobs $m:$s"; done
        (OUT=$OUT/w2_$pair JOBS="$jobs" REPEAT=2 BUDGET=${W2_BUDGET:-200} BENCH=throughput BENCH_ARGS="$args" \
          bash tools/w1_ab_device.sh 2>&1 | tail -5)
      done ;;
    jit)  # the balanced kernel by default (thirty-ninth session): no Triton compile after the engine is ready
      (OUT=$OUT/jit LIMIT=${JIT_LIMIT:-400} bash tools/gpu_tests_device.sh tests/gpu/test_no_late_jit.py \
        -k "llama or qwen3_moe or large_decode") ;;
    curve)  # MESHSERVE_FP8_GEMM=auto (the Triton GEMM up to 16 rows) on the 8B's small-batch decode steps
      (OUT=$OUT/curve JOBS="8b:default 8b:FP8_GEMM=auto" REPEAT=2 BUDGET=${CURVE_BUDGET:-300} BENCH=latency \
        BENCH_ARGS="--quantization fp8 --curve 1,2,4,8,16,32" bash tools/w1_ab_device.sh 2>&1 | tail -8)
      python3 - /tmp/w1_ab <<'PY'  # decode tok/s by batch, each run (w1_ab_device.sh keeps them there)
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    curve = json.load(open(path)).get("decode_tok_s_by_batch", {})
    print(f"{os.path.basename(path)[:-5]:<32}", " ".join(f"{b}:{v:.0f}" for b, v in curve.items()))
PY
      ;;
    moe)  # issue 23's W2 on Qwen3-30B-A3B with the balanced kernel (the default) against the split kernel
      (OUT=$OUT/moe JOBS="qwen3-30b-a3b:default qwen3-30b-a3b:DECODE_BALANCED=0" REPEAT=2 BUDGET=${MOE_BUDGET:-300} \
        BENCH=throughput bash tools/w1_ab_device.sh 2>&1 | tail -6) ;;
    trace)  # W2 step traces of the default build (bf16), for the simulator's refit (validation.ONE_GPU_W2)
      for m in ${TRACE_MODELS:-qwen3-0.6b llama-3.1-8b}; do
        timeout -k 10 "${TRACE_LIMIT:-150}" python3 -m meshserve.cli bench throughput --model $m --no-baseline \
          --step-trace $OUT/w2_${m}_steps.jsonl --output-json $OUT/w2_${m}_traced.json 2>&1 | grep -E "tok/s|Error" | tail -2
        gzip -f $OUT/w2_${m}_steps.jsonl
      done ;;
    layer)  # the kernel's own tests (18, compile-bound: 15 took 115 s on 2026-12-05), a limit each file (a barrier
      # that never opens hangs); then PARTS=layer_engine, the engine's (14 dense took 321 s; MoE ~200 s more)
      (OUT=$OUT/layer_kernel LIMIT=${LAYER_TEST_LIMIT:-200} bash tools/gpu_tests_device.sh \
        tests/kernels/test_triton_decode_layer.py) ;;
    layer_engine)
      (OUT=$OUT/layer_engine LIMIT=${LAYER_ENGINE_LIMIT:-560} bash tools/gpu_tests_device.sh \
        tests/gpu/test_gpu_decode_layer.py ${LAYER_ENGINE_K:+-k "$LAYER_ENGINE_K"}) ;;
    layer_w1)  # W1 Qwen3-0.6B, once PARTS=layer passed: default / one launch a layer (8 warps; 4: two programs'
      # registers fit an SM, so PDL can start the next layer early; 64 values a thread a trip) / one launch a phase
      (OUT=$OUT/layer_w1 JOBS="qwen:default qwen:DECODE_LAYER=1 qwen:DECODE_LAYER=1:1,4 qwen:DECODE_LAYER=phases
        qwen:DECODE_LAYER=1:1,8,64" REPEAT=2 BUDGET=${LAYER_BUDGET:-330} bash tools/w1_ab_device.sh 2>&1 | tail -8) ;;
    layer_moe)  # the same for Qwen3-30B-A3B's sparse layers (issue 23's W1), once PARTS=layer passed
      (OUT=$OUT/layer_moe_w1 JOBS="qwen3-30b-a3b:default qwen3-30b-a3b:DECODE_LAYER=1" REPEAT=2 \
        BUDGET=${LAYER_MOE_BUDGET:-300} bash tools/w1_ab_device.sh 2>&1 | tail -4) ;;
    layer_8b)  # W1 Llama-3.1-8B, bf16 then fp8 weights, once PARTS=layer passed (its tests include the fp8 path):
      # default / one launch a layer streaming 32 or 64 values a thread a trip (W1 8B moves < 1% between processes)
      for quant in ${LAYER_8B_QUANT:-bf16 fp8 awq}; do
        jobs="8b:default 8b:DECODE_LAYER=1 8b:DECODE_LAYER=1:1,8,64"  # (INT4 at 64: no spill since 2026-12-05)
        (OUT=$OUT/layer_8b_${quant}_w1 JOBS="$jobs" REPEAT=${LAYER_8B_REPEAT:-1} BUDGET=${LAYER_8B_BUDGET:-160} \
          BENCH_ARGS="$([ $quant != bf16 ] && echo --quantization $quant)" bash tools/w1_ab_device.sh 2>&1 | tail -5)
      done ;;
    layer_phases)  # where the layer kernel's time goes, phase by phase and barrier by barrier (its clocks)
      mkdir -p $OUT/layer_phases
      for job in ${LAYER_PHASE_JOBS:-qwen3-0.6b:bf16 llama-3.1-8b:bf16 llama-3.1-8b:fp8 llama-3.1-8b:int4 \
                 qwen3-30b-a3b:bf16 qwen3-0.6b:bf16:1,8,64 llama-3.1-8b:int4:1,8,64}; do
        IFS=: read -r m f tile <<< "$job"
        timeout -k 10 ${LAYER_PHASE_LIMIT:-90} python3 tools/decode_layer_phases.py --model $m --format $f \
          --tile ${tile:-1,8,32} --json $OUT/layer_phases/${m}_${f}_$(echo ${tile:-1,8,32} | tr , -).json 2>&1 | grep -v Warning
      done ;;
    *) echo "PARTS: tests, kernels, w2, jit, curve, moe, trace, layer, layer_engine, layer_w1, layer_moe, layer_8b, layer_phases;" \
         "got $part"
       exit 1 ;;
  esac
done
