#!/usr/bin/env bash
# Branch prefill-attn on one H200 (issue 18: the prompt tokens' attention of mixed steps). One device call per part:
#   PART=tests  the GPU tests of the persistent unified kernel and every tiling variant at Llama-3.1-8B shapes,
#               beside the unified / prefill / decode kernels' own (~5 min)
#   PART=bench  tools/bench_prefill_attention.py: every variant on the issue-18 step shapes, the 2k bucket and an
#               8k prefill, in CUDA graphs (< 2 min) -> $OUT/bench_prefill_attention.json
#   PART=e2e    tools/mixed_graph_bench.py --case 1014,254,700 --profile --top 10, with the default tiling
#               (persistent, diagonal masks; the default since 2026-12-01) and with the launch before it
#               (MESHSERVE_PREFILL_TILE_LEGACY=1), in the same session -> $OUT/e2e_new.json, $OUT/e2e_old.json
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"

case "${PART:-bench}" in
tests)
  timeout 560 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_triton_unified_persistent.py \
    tests/kernels/test_triton_unified_attention.py tests/kernels/test_triton_attention.py 2>&1 | tail -25
  ;;
bench)
  timeout 560 python3 tools/bench_prefill_attention.py --json "$OUT/bench_prefill_attention.json" 2>&1 \
    | grep -v '^{' ; echo "rows: $(grep -c '"case"' "$OUT/bench_prefill_attention.json" 2>/dev/null)"
  ;;
e2e)
  timeout 280 python3 tools/mixed_graph_bench.py --case 1014,254,700 --profile --top 10 \
    --json "$OUT/e2e_new.json"
  MESHSERVE_PREFILL_TILE_LEGACY=1 timeout 280 python3 tools/mixed_graph_bench.py \
    --case 1014,254,700 --profile --top 10 --json "$OUT/e2e_old.json"
  ;;
*)
  echo "PART=tests|bench|e2e" >&2
  exit 2
  ;;
esac
