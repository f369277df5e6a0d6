#!/usr/bin/env bash
# PDL A/B on one H200 (kernels/pdl.py): W1 batch-1 decode (`meshserve bench latency --no-baseline`, CUDA graphs)
# for Qwen3-0.6B and Llama-3.1-8B under MESHSERVE_PDL=0 / 1 and each variant, one tok/s line per run. Runs go in
# the order listed and stop starting new ones past BUDGET seconds (default 270), so one call stays under ~5 min.
# Usage (device, repo root, wheels in .whl if the machine lacks the deps):
#   [JOBS="qwen:off qwen:on 8b:off ..."] [BUDGET=270] [TESTS=1] bash tools/pdl_device.sh
# TESTS=1 first runs the PDL GPU tests (kernels, then whole decodes with each variant). Logs: $OUT/pdl_ab.tgz.
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/pdl_ab; mkdir -p $R $OUT

variant_env() {  # NAME -> the environment of that PDL variant (layers/backend_selection.py)
  case $1 in
  off) echo "MESHSERVE_PDL=0" ;;
  on) echo "MESHSERVE_PDL=1" ;;  # as measured 2026-11-30: early trigger, preload all
  auto) echo "MESHSERVE_PDL=auto" ;;
  late) echo "MESHSERVE_PDL=1 MESHSERVE_PDL_TRIGGER=late" ;;
  one_wave) echo "MESHSERVE_PDL=1 MESHSERVE_PDL_ONE_WAVE=1" ;;
  no_preload) echo "MESHSERVE_PDL=1 MESHSERVE_PDL_PRELOAD=none" ;;
  row_preload) echo "MESHSERVE_PDL=1 MESHSERVE_PDL_PRELOAD=row" ;;
  late_no_preload) echo "MESHSERVE_PDL=1 MESHSERVE_PDL_TRIGGER=late MESHSERVE_PDL_PRELOAD=none" ;;
  *) echo "unknown variant $1" >&2; return 1 ;;
  esac
}
model_name() { case $1 in qwen) echo qwen3-0.6b ;; 8b) echo llama-3.1-8b ;; *) echo "$1" ;; esac; }
# the 8B first (its loss is the question), then Qwen's gain under the same variants
DEFAULT_JOBS="8b:off 8b:on 8b:no_preload 8b:late 8b:one_wave 8b:row_preload qwen:off qwen:on qwen:no_preload
qwen:late qwen:one_wave 8b:late_no_preload 8b:auto qwen:auto"

if [ "${TESTS:-0}" = 1 ]; then
  timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_pdl.py tests/gpu/test_pdl_decode.py \
    > $R/gpu_tests.log 2>&1
  echo "== gpu tests rc $?: $(tail -1 $R/gpu_tests.log)"; grep -E "^FAILED|Error" $R/gpu_tests.log | head -8
fi
t_start=$SECONDS
printf "%-6s %-16s %10s %10s %6s  %s\n" model variant "tok/s" "decode" "secs" "policy bound"
for job in ${JOBS:-$DEFAULT_JOBS}; do
  model=$(model_name ${job%%:*}); variant=${job#*:}
  envs=$(variant_env $variant) || continue
  if [ $((SECONDS - t_start)) -ge ${BUDGET:-270} ]; then echo "skip $job (budget)"; continue; fi
  t0=$SECONDS
  env $envs timeout ${LIMIT:-120} python3 -m meshserve.cli --log-level INFO bench latency --model $model --no-baseline \
    --output-json $R/${job/:/_}.json > $R/${job/:/_}.log 2>&1
  rc=$?
  tok=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['tok_s']:.1f} {r['decode_tok_s']:.1f}\")" \
        $R/${job/:/_}.json 2>/dev/null || echo "rc=$rc -")
  # the policy the runner bound (its INFO line), to see that auto / the variant took
  policy=$(grep -o "pdl_policy=PdlPolicy([^)]*)" $R/${job/:/_}.log | head -1 | sed "s/pdl_policy=PdlPolicy//")
  printf "%-6s %-16s %10s %10s %6s  %s\n" ${job%%:*} $variant $tok $((SECONDS - t0)) "${policy:--}"
  [ $rc -ne 0 ] && grep -E "Error|error" $R/${job/:/_}.log | tail -3
done
tar czf $OUT/pdl_ab.tgz -C /tmp pdl_ab
