#!/usr/bin/env bash
# vLLM 0.26 at TP = 2 beside meshserve on nvidia-h200-x2, back to back (issue 21): W1 8B, and 70B at batch 1 and
# 32, each engine in its own process. Stage vLLM first, in three calls within the machine's warm window
# (../shared/tools/vllm-peer/README.md: carry .vp1: `mkdir -p /root/vstage && cp .vp1/* /root/vstage/`, then .vp2,
# .vp3), then this call carries .vp4 (it installs the staged vLLM and runs both):
#   bash tools/vllm_tp_device.sh            then meshserve's side: STEP=f bash tools/x2_tp_bench.sh
# Results: $OUT/vllm_tp_*.log, one RESULT line each.
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"
bash .vp4/run.sh .vp4 > /dev/null || { echo "staging .vp4 failed"; exit 1; }
. .vp4/env.sh  # installs the staged vLLM once; sets its PYTHONPATH (the checkout goes in front below)
export PYTHONPATH=$PWD:$PYTHONPATH
for job in "llama-3.1-8b 2 1" "llama-3.1-70b 2 1,32"; do
  name=vllm_tp_${job// /_}; name=${name//,/-}
  timeout 280 python3 tools/vllm_tp_peer.py $job > "$OUT/$name.log" 2>&1
  echo "== $job: rc $?"; grep -E "^RESULT|Error|Traceback" "$OUT/$name.log" | tail -3
done
