#!/usr/bin/env bash
# One device call for the mixed-step CUDA graphs (issues 18, 29): their GPU tests, eager vs graph per step
# shape (tools/mixed_graph_bench.py), then W3 with service-level targets (tools/w3_slo.sh) with mixed graphs
# up to GRAPH_TOKENS (default 1024; 0 = mixed steps eager, the baseline). Everything lands in $OUT/mixed.tgz.
# Usage (device, repo root, wheels in .whl): [GRAPH_TOKENS=N] [QPS=32,48] [SKIP_TESTS=1] bash tools/mixed_graphs_device.sh
set -u -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD:/tmp/site
FINAL_OUT=$OUT; export OUT=/tmp/mixed_out; mkdir -p $OUT
tokens=${GRAPH_TOKENS:-1024}
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 170 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_mixed_graphs.py \
    tests/kernels/test_triton_unified_attention.py tests/kernels/test_triton_attention.py > $OUT/gpu_tests.log 2>&1
  rc=$?; echo "== gpu tests rc $rc: $(tail -1 $OUT/gpu_tests.log)"
  [ $rc -ne 0 ] && grep -E "^FAILED|Error" $OUT/gpu_tests.log | head -8 && tokens=0
  timeout 130 python3 tools/mixed_graph_bench.py llama-3.1-8b --max-cudagraph-tokens 1024 --profile \
    --json $OUT/mixed_bench.json > $OUT/mixed_bench.log 2>&1; echo "== mixed bench rc $?"
  grep -vE "^\s*$" $OUT/mixed_bench.log | grep -vE "Warning|warn" | tail -25
fi
if [ -n "${FIRST_REQUEST:-}" ]; then  # a fresh engine's first requests, cold Triton cache (issue 29)
  TRITON_CACHE_DIR=/tmp/tc_cold_$$ timeout 100 python3 tools/first_request_probe.py llama-3.1-8b \
    --json $OUT/first_request.json > $OUT/first_request.log 2>&1; echo "== first request rc $?"
  grep -E "^\{" $OUT/first_request.log | cut -c1-400
fi
echo "== W3 with --max-cudagraph-tokens $tokens"
bash tools/w3_slo.sh ${QPS:-32,48,64,96} --max-cudagraph-tokens $tokens | grep -vE "^\s*$" | tail -30
grep -E "mixed-step|decode CUDA|warmed|ready" $OUT/serve.log | cut -c1-200
gzip -f $OUT/steps.jsonl 2>/dev/null
tar czf $FINAL_OUT/mixed.tgz -C /tmp mixed_out
