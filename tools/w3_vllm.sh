#!/usr/bin/env bash
# vLLM 0.26's W3 beside meshserve's, same machine and session, the same client (issue 18's peer figure): after the
# three uploads .vp1-.vp3 were staged in earlier calls (../shared/tools/vllm-peer/README.md: `mkdir -p
# /root/vstage && cp .vp1/* /root/vstage/`, then .vp2, .vp3, within the machine's warm window), this call carries
# .vp4 and .whl: it installs vLLM, serves the Llama-3.1-8B arch (dummy weights, default flags) on port 8001, runs
# `meshserve bench serve` (W3 draws, seed 1000 + QPS) over QPS, stops it. Then run meshserve's side in the next
# call: `CLIENT_PROCS=8 bash tools/w3_slo.sh QPS --api-server-count 4`.
# Usage (device, repo root; carry [".vp4", ".whl"]: 62 MiB of the 64 allowed, so not .whl-structured):
#   [CLIENT_PROCS=8] [MODEL=qwen3-0.6b] bash tools/w3_vllm.sh [QPS list, default 48,64,96]
# Results: $OUT/w3_vllm.json, $OUT/w3_vllm.txt, $OUT/vllm_serve.log.
set -u -o pipefail
qps=${1:-48,64,96}
model=${MODEL:-llama-3.1-8b}
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
bash .vp4/run.sh .vp4 > /dev/null || { echo "staging .vp4 failed"; exit 1; }
t0=$SECONDS
bash .vp4/serve.sh $model 8001 || exit 1  # installs the staged vLLM first (.vp4/env.sh; it says if unstaged)
echo "vLLM ready after $((SECONDS - t0)) s"
timeout 480 python3 -m meshserve.cli bench serve --base-url http://127.0.0.1:8001 --model $model \
  --label vllm-0.26 --qps "$qps" --client-procs "${CLIENT_PROCS:-8}" --no-progress --output-json "$OUT/w3_vllm.json" \
  2>&1 | tee "$OUT/w3_vllm.txt"
kill "$(cat /tmp/vllm-serve.pid)" 2> /dev/null
