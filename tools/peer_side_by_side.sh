#!/usr/bin/env bash
# meshserve beside vLLM 0.26 on one GPU, back to back in one device call (issue 29's curve and W2 goals): vLLM's
# decode curve, W1 and W2 (../shared/tools/vllm-peer's bench.py, its own process), then meshserve's
# `bench latency --curve 1,8,32,64,128,256` and `bench throughput --repeat N`, then one table of both
# (tools/peer_compare.py). Stage vLLM first (tools/vllm_stage.sh: one call per upload folder, back to back).
#   carry [".vp4"]:  bash tools/peer_side_by_side.sh qwen3-0.6b    (installs the staged vLLM; keeps .vp4 in
#                    /root/keep/vp4 for the lease's later calls)
#   later calls:     VP=/root/keep/vp4 bash tools/peer_side_by_side.sh llama-3.1-8b
# The wheels .whl / .whl-tf travel in an earlier call of the lease (cp -r .whl .whl-tf /root/keep/): .vp4 with
# them passes the 64 MiB carry limit. VLLM_MODES (default curve,w1,w2: both sides run those; meshserve's curve
# run gives its W1 too), REPEAT (default 3), ORDER=meshserve runs meshserve first. QUANT=fp8 and KV_DTYPE=fp8
# reach both sides (vLLM's bench.py reads them; meshserve takes --quantization / --kv-cache-dtype), for issue 20's
# same-flag ratios. Logs and JSON: $OUT.
set -u -o pipefail
[ -d .whl ] || cp -r /root/keep/.whl /root/keep/.whl-tf . 2> /dev/null
. "$(dirname "$0")/device_env.sh"
export OUT; mkdir -p "$OUT"
model=${1:?usage: peer_side_by_side.sh MODEL}
vp=${VP:-.vp4}
src=""
if [ "$vp" = .vp4 ]; then src=.vp4; rm -rf /root/keep/vp4; mkdir -p /root/keep; cp -r .vp4 /root/keep/vp4; fi
run_vllm() {
  t=$SECONDS
  bash "$vp/run.sh" "$src" "$model:$modes"
  echo "vLLM $model: $((SECONDS - t)) s"
}
modes=${VLLM_MODES:-curve,w1,w2}
flags=(${QUANT:+--quantization "$QUANT"} ${KV_DTYPE:+--kv-cache-dtype "$KV_DTYPE"})
run_meshserve() {
  t=$SECONDS
  if [[ ",$modes," == *,curve,* || ",$modes," == *,w1,* ]]; then
    timeout 240 python3 -m meshserve.cli --log-level INFO bench latency --model "$model" --no-baseline "${flags[@]}" \
      --curve 1,8,32,64,128,256 --output-json "$OUT/ms_curve_$model.json" > "$OUT/ms_curve_$model.log" 2>&1 \
      || { echo "meshserve curve failed"; tail -5 "$OUT/ms_curve_$model.log"; }
  fi
  if [[ ",$modes," == *,w2,* ]]; then
    timeout 240 python3 -m meshserve.cli --log-level INFO bench throughput --model "$model" --no-baseline "${flags[@]}" \
      --repeat "${REPEAT:-3}" --output-json "$OUT/ms_w2_$model.json" > "$OUT/ms_w2_$model.log" 2>&1 \
      || { echo "meshserve W2 failed"; tail -5 "$OUT/ms_w2_$model.log"; }
  fi
  echo "meshserve $model: $((SECONDS - t)) s"
}
if [ "${ORDER:-vllm}" = meshserve ]; then run_meshserve; run_vllm; else run_vllm; run_meshserve; fi
python3 tools/peer_compare.py "$OUT/vllm_$model.log" "$OUT/ms_curve_$model.json" "$OUT/ms_w2_$model.json"
