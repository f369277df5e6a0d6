#!/usr/bin/env bash
# Structured outputs on the GPU (issue 27), one engine per call: serve the dummy-weight model folder with SmolLM2's
# real tokenizer (tools/make_structured_model.py: Llama-3.1-8B architecture, vocabulary 49,152), warm it up, then
# `meshserve bench serve` at concurrency 1 and 64 on the same twenty extraction prompts (chat, greedy, max_tokens
# 128, EOS allowed): first free (answers scored against the schema), then with response_format json_schema (the
# schema of `meshserve bench structured`), then free again with max_tokens = the schema answers' mean length (the
# like-for-like baseline: as many prefills per decoded token; a random model's free answers run to max_tokens).
# Each run times its first request alone (with the schema: the compile). Prints one table (tok/s, TPOT, ITL p50,
# their overheads; read the goal off the "same length" rows); JSON and logs under $OUT. For meshserve it first
# times the grammar host work per step on this host's CPU (meshserve.bench.grammar_host: per-row vs batched fill,
# 1-8 threads) and how long the mask's non-blocking copy takes to return from pageable vs pinned memory.
#
# Usage, on the device from the repo root:
#   meshserve: carry .whl, .whl-structured (xgrammar, jsonschema: 5 MiB) and .smodel/llama-3.1-8b-smol:   bash tools/structured_device.sh meshserve
#   vLLM 0.26: the peer's uploads of .vp1-.vp3 first (../shared/tools/vllm-peer/README.md), then carry .vp4 and
#              .smodel/llama-3.1-8b-smol (it installs vLLM from the staged parts):   bash tools/structured_device.sh vllm
# Env: MODEL_DIR (default .smodel/llama-3.1-8b-smol), CONC (1,64), NUM_PROMPTS (48,640: per point), OUTPUT_LEN (128),
#      ENGINE_FLAGS (more serve flags), STEP_TRACE=1 (meshserve: a step trace of the runs, then per run and batch
#      size the engine's step period, device time and host wait: tools/step_trace_phases.py says whether a
#      slower constrained step is host time, device time, or neither (then it is lost after the engine); and
#      per run the CPU share of the server's busiest threads, tools/proc_cpu.py: a front end or core thread
#      near 100% is the bottleneck), GRAMMAR_PROBE=no_matchers|no_masks (meshserve: MESHSERVE_GRAMMAR_PROBE,
#      engine/grammar_probe.py: the schema run keeps the engine's grammar path without xgrammar's host work
#      (no_matchers: all-ones masks still copied and applied; no_masks: no masks), answers unconstrained, so
#      its "same length" row is the cost of what is left; the normal run minus it is xgrammar's host work)
set -u -o pipefail
engine=${1:?usage: tools/structured_device.sh meshserve|vllm}
model=${MODEL_DIR:-.smodel/llama-3.1-8b-smol}; name=$(basename "$model")
conc=${CONC:-1,64}; nums=${NUM_PROMPTS:-48,640}; out_len=${OUTPUT_LEN:-128}
data=meshserve/bench/data
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"  # the device call sets OUT; elsewhere (a CPU dry run) set -u would stop here
[ -f "$model/tokenizer.json" ] || { echo "no model folder $model: build it with tools/make_structured_model.py and carry it"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
case $engine in
  meshserve)
    if [ -d .whl ]; then  # absent: the packages are installed already (a CPU dry run)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl $(ls .whl-structured/*.whl 2> /dev/null) || exit 1
    fi
    client_path=$PWD:/tmp/site port=8000
    trace_flags=""; [ "${STEP_TRACE:-0}" = 1 ] && trace_flags="--step-trace $OUT/steps.jsonl" && : > $OUT/phases.txt
    PYTHONPATH=$client_path timeout 180 python3 -m meshserve.bench.grammar_host --batch 64 --tokenizer "$model" \
      --threads 1,2,4,8 --copy-probe --output-json $OUT/grammar_host.json 2>&1 | tee $OUT/grammar_host.txt
    [ -n "${GRAMMAR_PROBE:-}" ] && export MESHSERVE_GRAMMAR_PROBE=$GRAMMAR_PROBE && echo "grammar probe: $GRAMMAR_PROBE"
    PYTHONPATH=$client_path python3 -m meshserve.cli serve "$model" --load-format dummy --max-model-len 4096 \
      --port $port --served-model-name "$name" --disable-access-log $trace_flags ${ENGINE_FLAGS:-} > $OUT/serve_meshserve.log 2>&1 &
    ;;
  vllm)
    if [ -d .vp4 ]; then bash .vp4/run.sh .vp4 > /dev/null && . .vp4/env.sh; fi  # stage the last part, install
    [ -d /root/vsite/vllm ] || { echo "vLLM is not installed: stage .vp1-.vp3, then carry .vp4 (vllm-peer README)"; exit 1; }
    export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
    client_path=$PWD:/root/vsite port=8001
    # the grammar meshserve compiles: xgrammar, compact JSON (vLLM's default lets whitespace in between items)
    PYTHONPATH=/root/vsite python3 -m vllm.entrypoints.openai.api_server --model "$model" --load-format dummy \
      --served-model-name "$name" --max-model-len 4096 --gpu-memory-utilization 0.9 --port $port \
      --structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}' ${ENGINE_FLAGS:-} \
      > $OUT/serve_vllm.log 2>&1 &
    ;;
  *) echo "engine must be meshserve or vllm, got $engine"; exit 2 ;;
esac
pid=$! t0=$(date +%s)
for _ in $(seq 1 400); do
  curl -sf localhost:$port/health > /dev/null && break
  kill -0 $pid 2> /dev/null || { echo "server died"; tail -30 $OUT/serve_$engine.log; exit 1; }
  sleep 1
done
curl -sf localhost:$port/health > /dev/null || { echo "server not ready"; tail -30 $OUT/serve_$engine.log; kill $pid; exit 1; }
echo "$engine ready after $(( $(date +%s) - t0 )) s"

now() { python3 -c 'import time; print(time.monotonic())'; }  # the step trace's clock
bench() {  # MODE [flags]: one bench serve run on the extraction prompts
  local mode=$1 start; shift; start=$(now)
  local watcher=""
  if [ -f $OUT/phases.txt ]; then  # the busiest threads each second (front end, engine core, bench client)
    python3 tools/proc_cpu.py watch 0 1.0 > $OUT/cpu_$mode.txt & watcher=$!
  fi
  PYTHONPATH=$client_path timeout 240 python3 -m meshserve.cli bench serve --base-url http://127.0.0.1:$port \
    --model "$name" --label $engine --endpoint chat --prompts-file $data/person_prompts.jsonl --no-ignore-eos \
    --no-progress "$@" 2>&1 | tee $OUT/bench_${engine}_$mode.txt | grep -vE "^\s*$"
  if [ -n "$watcher" ]; then
    echo "$mode $start $(now)" >> $OUT/phases.txt
    kill $watcher; wait $watcher 2> /dev/null
    echo "$mode: CPU share of the busiest threads per second (tid in brackets; main: the process's own)"
    cat $OUT/cpu_$mode.txt
  fi
  return 0
}
# warm-up (first-request costs that are not the grammar's), then free, then with the schema
bench warmup --concurrency 8 --num-prompts 16 --output-len 16 > /dev/null
common=(--concurrency $conc --num-prompts $nums)
bench free "${common[@]}" --output-len $out_len --score-json-schema $data/person_schema.json \
  --output-json $OUT/structured_${engine}_free.json
bench schema "${common[@]}" --output-len $out_len --response-format-json-schema $data/person_schema.json \
  --output-json $OUT/structured_${engine}_schema.json
matched=$(PYTHONPATH=$client_path python3 -m meshserve.bench.serve_structured matched-len \
  $OUT/structured_${engine}_schema.json) || matched=""
reports=($OUT/structured_${engine}_free.json $OUT/structured_${engine}_schema.json)
if [ -n "$matched" ]; then
  echo "free run with max_tokens $matched (the schema answers' mean length)"
  bench free_matched "${common[@]}" --output-len $matched --score-json-schema $data/person_schema.json \
    --output-json $OUT/structured_${engine}_free_matched.json
  [ -f $OUT/structured_${engine}_free_matched.json ] && reports+=($OUT/structured_${engine}_free_matched.json)
fi
PYTHONPATH=$client_path python3 -m meshserve.bench.serve_structured table "${reports[@]}" \
  --output-json $OUT/structured_${engine}_table.json
grep -iE "grammar|xgrammar|structured" $OUT/serve_$engine.log | grep -viE "warn" | head -5 | cut -c1-200
kill -TERM $pid; wait $pid 2> /dev/null  # (the step trace is complete once the core closed it)
if [ -f $OUT/phases.txt ] && [ -f $OUT/steps.jsonl ]; then
  echo "step trace (engine side): period = time between step reads; host wait ~0 = host-bound"
  PYTHONPATH=$client_path python3 tools/step_trace_phases.py $OUT/steps.jsonl $OUT/phases.txt | tee $OUT/step_phases.txt
fi
exit 0
