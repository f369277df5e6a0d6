#!/usr/bin/env bash
# Prefill/decode disaggregation against a colocated pair (issue 25), `python -m meshserve.bench.disagg`: Llama-3.1-8B
# arch, dummy weights, the bursty long-prompt workload (prompts 2,048-8,192, 128-512 out; TTFT <= 2 s, TPOT <= 25 ms).
# On 2 GPUs (nvidia-h200-x2) each instance has its own GPU and the KV moves over NCCL; on one GPU (nvidia-h200)
# both instances share it, each with a KV pool of 16,384 blocks (32 GiB; the engine's own sizing would count the
# other instance's memory as taken: GPU_BLOCKS overrides) and the KV moves over gloo through host memory: that
# measures the mechanism (transfer, hand-off, the router's legs), not the goodput gain of two GPUs. The script
# picks by the GPUs it sees (SECOND_GPU=0|1 overrides). One call (< 9.5 min): SETUPS (default colocated,layerwise)
# at QPS (default 2,4) with N prompts (48) per point; CONNECTOR=nixl (carry .whl-nixl) moves the KV with NIXL
# (on one GPU: UCX falls back to TCP through host memory, 0.39 GB/s) instead; CONNECTOR=ipc with the ipc
# connector (the decode instance maps the prefill instance's pool by CUDA IPC and copies device to device, one
# GPU or two). PARTS (default goodput) picks what runs: "goodput" the run above (with CONNECTOR=ipc SECOND_GPU=0:
# W-disagg, 1 prefill + 1 decode process on one H200 vs 2 colocated replicas behind the router); "link" (a call
# of its own, ~5 min) the ipc GPU tests (tests/disagg/test_ipc_connector.py, test_disagg_gpu.py's ipc cases) and
# the KV link alone (`meshserve.bench.kv_link --connector ipc`: one request's blocks, 16 and 256 of
# Llama-3.1-8B's 32 layers, pulled 20 times; the median rate as a fraction of the best plain copy of the same
# bytes on the GPU, copy_GBps / fraction_of_copy; on 2 GPUs also from GPU 1 into GPU 0). Results: goodput
# $OUT/disagg.json, $OUT/disagg.log, $OUT/disagg_logs.tgz; link $OUT/ipc_tests.log, $OUT/kv_link_ipc_*.json.
# MPS=1 (one GPU) starts an MPS control daemon for the call (pipes under /tmp/nvidia-mps, stopped at the end) so
# the two instances run kernels at once instead of time-slicing the GPU; SM_SHARE=P,D then gives the prefill
# instance P% of the SMs and the decode instance D% (bench.disagg --sm-share); the colocated pair runs under the
# same daemon without a limit. Both arms share the GPU either way; MPS changes how.
#   bash tools/disagg_device.sh                                   (gloo / NCCL)
#   CONNECTOR=ipc SECOND_GPU=0 MPS=1 SM_SHARE=60,40 QPS=2,3 bash tools/disagg_device.sh
#   CONNECTOR=ipc PARTS=link bash tools/disagg_device.sh          (then CONNECTOR=ipc SECOND_GPU=0 for goodput)
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/disagg_dev; rm -rf $R; mkdir -p $R $OUT
gpus=$(nvidia-smi -L 2> /dev/null | wc -l)
second=${SECOND_GPU:-$([ "$gpus" -gt 1 ] && echo 1 || echo 0)}
connector=${CONNECTOR:-torch}
echo "GPUs: $gpus; second instance on GPU $second; connector $connector"
parts=",${PARTS:-goodput},"
if [[ $parts == *,link,* ]]; then
  timeout -k 10 200 python3 -m pytest -q -m gpu -k ipc tests/disagg/test_ipc_connector.py tests/disagg/test_disagg_gpu.py \
    > "$OUT/ipc_tests.log" 2>&1
  echo "== ipc GPU tests rc $?"; tail -3 "$OUT/ipc_tests.log"
  pairs="cuda:0>cuda:0"; [ "$gpus" -gt 1 ] && pairs="$pairs cuda:1>cuda:0"
  for pair in $pairs; do
    for blocks in 16 256; do
      f="$OUT/kv_link_ipc_${pair//[:>]/}_${blocks}.json"
      timeout -k 10 120 python3 -m meshserve.bench.kv_link --connector ipc --producer-device "${pair%>*}" \
        --device "${pair#*>}" --blocks $blocks --pool-blocks 512 --repeat 20 --output "$f" > "$f.log" 2>&1
      echo "== kv_link ipc ${pair} $blocks blocks rc $?: $(python3 -c "import json,sys; d=json.load(open(sys.argv[1]))
print(f\"{d['bytes']/2**20:.0f} MiB, median {d['median_GBps']:.1f} GB/s ({1e3*d['median_s']:.2f} ms), copy \
{d['copy_GBps']:.1f} GB/s: {100*d['fraction_of_copy']:.0f}%\")" "$f" 2>&1 | tail -1)"
    done
  done
fi
[[ $parts == *,goodput,* ]] || exit 0
if [ "${MPS:-0}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps CUDA_MPS_LOG_DIRECTORY=/tmp/nvidia-mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d || { echo "MPS: the control daemon did not start"; exit 1; }
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
  echo "MPS control daemon started (SM_SHARE ${SM_SHARE:-none})"
fi
timeout -k 20 ${LIMIT:-540} python3 -m meshserve.bench.disagg --second-gpu "$second" --connector "$connector" --qps "${QPS:-2,4}" \
  --num-prompts "${N:-48}" --setups "${SETUPS:-colocated,layerwise}" ${GPU_BLOCKS:+--gpu-blocks $GPU_BLOCKS} \
  ${SM_SHARE:+--sm-share $SM_SHARE} \
  --log-dir $R --output "$OUT/disagg.json" --plot "$OUT/disagg.svg" \
  > "$OUT/disagg.log" 2>&1
echo "== disagg rc $?"; grep -vE "^\s*$" "$OUT/disagg.log" | grep -v -i warn | tail -16
tar czf "$OUT/disagg_logs.tgz" -C /tmp disagg_dev
