#!/usr/bin/env bash
# KV offload tiers on one H200 (issue 26), Llama-3.1-8B arch, dummy weights, bf16 (128 KiB of KV per token):
#  0. host: `python -m meshserve.bench.kv_offload_host`: the restore path's host time for 1,024 blocks, the
#     revisit's copies before its forward with/without write-through, the disk tier's write/read GB/s (2 GiB).
#  1. revisit: `python -m meshserve.bench.kv_offload --history 16384`: TTFT of a revisited 16K-token history
#     recomputed vs restored (GPU pool 1400 blocks = 2.7 GiB; 3 fillers of 16K push the history out; CPU tier
#     16 GiB; 3 GiB CPU in front of a 24 GiB disk tier; that disk after a restart). Goal: >= 5x.
#  2. multiturn: `python -m meshserve.bench.multiturn`: 72 conversations x 6 turns (opening 2,048 ids, +128 user
#     ids and the 64-token answer per turn, think ~Exp(2 s), starts Poisson 6/s; random.seed(26)) through the
#     OpenAI server, GPU pool 2048 blocks = 4 GiB = 32K tokens against 221K tokens of histories (6.75x); no
#     offload / CPU tier 28 GiB / 4 GiB CPU + 24 GiB disk; goodput at TTFT <= 1 s, TPOT <= 50 ms, prefix hit
#     rate, TTFT p50/p99. Goal: goodput >= 2x no offload.
# Time (each part under its own timeout, the script under 9 min): revisit <= 220 s (4 engine starts of ~20-30 s,
# 5 prefills of 16K each); multiturn <= 280 s (3 server starts of ~20-30 s + warm-up, loads capped at 60 s each
# by --max-duration, then the in-flight turns finish). Usage (device, repo root; carry .whl if the packages are
# not installed):
#   bash tools/kv_offload_device.sh            # both parts
#   PARTS=multiturn bash tools/kv_offload_device.sh     # one part; MT_ARGS replaces the load flags (default: the
#   medium load of 2026-12-01, 72 conversations, starts 6/s, think 2 s; MT_ARGS="" the module's light defaults)
# Results: $OUT/host.jsonl, $OUT/revisit.jsonl, $OUT/multiturn.json, their logs, $OUT/server_logs.tgz, $OUT/env.txt.
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"
MODEL=${MODEL:-llama-3.1-8b}
R=/tmp/kv_offload_dev; rm -rf $R; mkdir -p $R/logs
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2> /dev/null; date -u; git log -1 --oneline 2> /dev/null
  free -g | head -2; df -h /tmp | tail -1; } > "$OUT/env.txt"
t0=$SECONDS

if [[ " ${PARTS:-host revisit multiturn} " == *" host "* ]]; then  # ~20 s: the host side on this machine's cores
  timeout -k 10 ${HOST_LIMIT:-60} python3 -m meshserve.bench.kv_offload_host --disk-blocks 1024 --disk-path /tmp \
    > "$OUT/host.jsonl" 2> "$OUT/host.log"
  echo "== host rc $? in $((SECONDS - t0)) s"; cat "$OUT/host.jsonl"
fi

if [[ " ${PARTS:-host revisit multiturn} " == *" revisit "* ]]; then
  timeout -k 20 ${REVISIT_LIMIT:-220} python3 -m meshserve.bench.kv_offload --model "$MODEL" --history 16384 \
    --disk-path $R/disk-revisit ${REVISIT_ARGS:-} > "$OUT/revisit.jsonl" 2> "$OUT/revisit.log"
  echo "== revisit rc $? in $((SECONDS - t0)) s"; cat "$OUT/revisit.jsonl"; grep -E "Error|error" "$OUT/revisit.log" | tail -3
  rm -rf $R/disk-revisit
fi

if [[ " ${PARTS:-host revisit multiturn} " == *" multiturn "* ]]; then
  t1=$SECONDS
  timeout -k 20 ${MULTITURN_LIMIT:-280} python3 -m meshserve.bench.multiturn --model "$MODEL" --gpu-blocks 2048 \
    --cpu-gib 28 --staging-cpu-gib 4 --disk-gib 24 --disk-path $R/disk-multiturn --max-duration 60 \
    --log-dir $R/logs --output "$OUT/multiturn.json" ${MT_ARGS---conversations 72 --start-rate 6 --think-mean-s 2} \
    > "$OUT/multiturn.log" 2>&1
  echo "== multiturn rc $? in $((SECONDS - t1)) s"; grep -vE "^\s*$" "$OUT/multiturn.log" | tail -12
  rm -rf $R/disk-multiturn
fi
tar czf "$OUT/server_logs.tgz" -C $R logs
echo "== total $((SECONDS - t0)) s"
