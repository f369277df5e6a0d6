#!/usr/bin/env bash
# Issues 20, 23, 24 on one H200: meshserve's W1/W2 with quantized weights and an FP8 KV cache (beside bf16 in the
# same call) and the MoE / MLA presets, dummy weights. JOBS picks jobs by name (default: all of QUANT_JOBS);
# TESTS=1 first runs the GPU tests of the code the jobs take. Logs and JSON go into $OUT/quant_moe.tgz, the
# summary lines to stdout. vLLM's side: .vp4/bench.py with QUANT=fp8 / KV_DTYPE=fp8 (../shared/tools/vllm-peer).
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/quant_moe; mkdir -p $R
MS="python3 -m meshserve.cli"

job_args() {  # NAME -> the bench arguments
  case $1 in
  w1_8b_bf16) echo "latency --model llama-3.1-8b" ;;
  w1_8b_fp8) echo "latency --model llama-3.1-8b --quantization fp8" ;;
  w1_8b_awq) echo "latency --model llama-3.1-8b --quantization awq" ;;
  w1_8b_pdl) echo "latency --model llama-3.1-8b" ;;
  w1_qwen_bf16) echo "latency --model qwen3-0.6b" ;;
  w1_qwen_pdl) echo "latency --model qwen3-0.6b" ;;
  w2_8b_bf16) echo "throughput --model llama-3.1-8b" ;;
  w2_8b_fp8_fp8kv) echo "throughput --model llama-3.1-8b --quantization fp8 --kv-cache-dtype fp8" ;;
  w2_qwen_bf16) echo "throughput --model qwen3-0.6b" ;;
  w2_qwen_fp8kv) echo "throughput --model qwen3-0.6b --kv-cache-dtype fp8" ;;
  w1_qwen3moe) echo "latency --model qwen3-30b-a3b" ;;
  w2_qwen3moe) echo "throughput --model qwen3-30b-a3b" ;;
  w1_dsv2lite) echo "latency --model deepseek-v2-lite" ;;
  w2_dsv2lite) echo "throughput --model deepseek-v2-lite" ;;
  *) echo "unknown job $1" >&2; return 1 ;;
  esac
}
QUANT_JOBS="w1_8b_bf16 w1_8b_fp8 w1_8b_awq w2_8b_bf16 w2_8b_fp8_fp8kv w2_qwen_bf16 w2_qwen_fp8kv"

if [ "${TESTS:-0}" = 1 ]; then
  timeout ${TEST_LIMIT:-150} python3 -m pytest -m gpu -q -p no:cacheprovider ${TEST_PATHS:-tests/kernels/test_quant_kernels.py tests/kernels/test_fp8_kv_cache.py} > $R/tests.log 2>&1
  echo "== tests: rc $? ($(tail -1 $R/tests.log))"; grep -E "^FAILED|Error" $R/tests.log | head -8
fi
for job in ${JOBS:-$QUANT_JOBS}; do
  args=$(job_args $job) || continue
  env_pdl=""; case $job in *_pdl) env_pdl="MESHSERVE_PDL=1" ;; esac
  t0=$SECONDS
  env $env_pdl timeout ${LIMIT:-150} $MS bench $args --no-baseline --output-json $R/$job.json > $R/$job.log 2>&1
  rc=$?
  echo "== $job: rc $rc, $((SECONDS - t0)) s"
  grep -v -i "warn" $R/$job.log | grep -E "tok/s|roofline|blocks|seconds|Error|error" | tail -6
done
tar czf $OUT/quant_moe.tgz -C /tmp quant_moe
