#!/usr/bin/env bash
# Prefill/decode disaggregation against a colocated pair (issue 25), `python -m meshserve.bench.disagg`: Llama-3.1-8B
# arch, dummy weights, the bursty long-prompt workload (prompts 2,048-8,192, 128-512 out; TTFT <= 2 s, TPOT <= 25 ms).
# On 2 GPUs (nvidia-h200-x2) each instance has its own GPU and the KV moves over NCCL; on one GPU (nvidia-h200)
# both instances share it, each with a KV pool of 16,384 blocks (32 GiB; the engine's own sizing would count the
# other instance's memory as taken: GPU_BLOCKS overrides) and the KV moves over gloo through host memory: that
# measures the mechanism (transfer, hand-off, the router's legs), not the goodput gain of two GPUs. The script
# picks by the GPUs it sees (SECOND_GPU=0|1 overrides). One call (< 9.5 min): SETUPS (default colocated,layerwise)
# at QPS (default 2,4) with N prompts (48) per point; CONNECTOR=nixl (carry .whl-nixl) moves the KV with NIXL
# (on one GPU: CUDA IPC, device to device) instead. Results: $OUT/disagg.json, $OUT/disagg.log, $OUT/disagg_logs.tgz.
#   bash tools/disagg_device.sh
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/disagg_dev; rm -rf $R; mkdir -p $R $OUT
gpus=$(nvidia-smi -L 2> /dev/null | wc -l)
second=${SECOND_GPU:-$([ "$gpus" -gt 1 ] && echo 1 || echo 0)}
echo "GPUs: $gpus; second instance on GPU $second"
timeout -k 20 ${LIMIT:-540} python3 -m meshserve.bench.disagg --second-gpu "$second" --connector "${CONNECTOR:-torch}" --qps "${QPS:-2,4}" \
  --num-prompts "${N:-48}" --setups "${SETUPS:-colocated,layerwise}" ${GPU_BLOCKS:+--gpu-blocks $GPU_BLOCKS} \
  --log-dir $R --output "$OUT/disagg.json" \
  > "$OUT/disagg.log" 2>&1
echo "== disagg rc $?"; grep -vE "^\s*$" "$OUT/disagg.log" | grep -v -i warn | tail -16
tar czf "$OUT/disagg_logs.tgz" -C /tmp disagg_dev
