#!/usr/bin/env bash
# Issue 20 on one H200: the batch-1 fp8 / int4 GEMV variants. TESTS=1 first runs their GPU tests; SWEEP=1 (default)
# runs tools/bench_quant_gemv.py (every variant and tile shape at Llama-3.1-8B's projections, < 90 s); then W1
# (meshserve bench latency, dummy weights) once per job of JOBS, each variant picked by MESHSERVE_FP8_GEMV /
# MESHSERVE_INT4_GEMV. A W1 8B job takes ~1-1.5 min: split JOBS over calls to stay under 10 min a call.
# Logs and JSON go into $OUT/quant_gemv.tgz, the summary lines to stdout.
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/quant_gemv; mkdir -p $R

job_env() {  # NAME -> "ENV=... --quantization X" (the bench latency arguments after the model)
  case $1 in
  bf16) echo "" ;;
  fp8_cvt | fp8_half | fp8_local | fp8_words | fp8_scaled_mm) echo "MESHSERVE_FP8_GEMV=${1#fp8_} --quantization fp8" ;;
  awq_half | awq_matmul) echo "MESHSERVE_INT4_GEMV=${1#awq_} --quantization awq" ;;
  *) echo "unknown job $1" >&2; return 1 ;;
  esac
}

if [ "${TESTS:-0}" = 1 ]; then
  timeout ${TEST_LIMIT:-240} python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_quant_gemv.py > $R/tests.log 2>&1
  echo "== tests: rc $? ($(tail -1 $R/tests.log))"; grep -E "^FAILED|Error" $R/tests.log | head -8
fi
if [ "${SWEEP:-1}" = 1 ]; then
  t0=$SECONDS
  timeout ${SWEEP_LIMIT:-150} python3 tools/bench_quant_gemv.py --out $R/bench_quant_gemv.json ${SWEEP_ARGS:-} > $R/sweep.log 2>&1
  echo "== sweep: rc $?, $((SECONDS - t0)) s"
  grep -E "^(bf16|fp8|int4)/|^winner|copy bandwidth|MISMATCH|Error" $R/sweep.log
fi
for job in ${JOBS-fp8_half awq_half}; do  # JOBS="" runs none
  spec=$(job_env $job) || continue
  envs=$(echo "$spec" | tr ' ' '\n' | grep = | tr '\n' ' '); args=$(echo "$spec" | tr ' ' '\n' | grep -v = | tr '\n' ' ')
  t0=$SECONDS
  env $envs timeout ${LIMIT:-180} python3 -m meshserve.cli bench latency --model llama-3.1-8b $args --no-baseline \
    --output-json $R/w1_$job.json > $R/w1_$job.log 2>&1
  echo "== w1 $job ($envs): rc $?, $((SECONDS - t0)) s"
  grep -v -i "warn" $R/w1_$job.log | grep -E "tok/s|roofline|Error|error" | tail -4
done
tar czf $OUT/quant_gemv.tgz -C /tmp quant_gemv
