#!/usr/bin/env bash
# Issue 21 on nvidia-h200-x2: STEP=a: all-reduce by size + the multi-GPU correctness tests; STEP=b: W1 8B at
# TP = 1, TP = 2 (one-shot all-reduce) and TP = 2 (NCCL only); STEP=c: 70B at TP = 2 (batch 1 and 32), W2 8B
# at PP = 2 beside TP = 1; STEP=f: b and the 70B curve in one call (watchdogs); STEP=g: W2 8B at TP = 1, PP = 2, TP = 2
# and the multi-GPU tests; STEP=pp: the PP = 2 GPU tests, W2 8B at TP = 1 and PP = 2 (depth 2 and 3; SEQS, PART,
# PROFILE); STEP=ho: the same with the PP token hand-off;
# STEP=p: step profiles; STEP=dp: W3 at DP=1 and DP=2 back to back (DP_RUNS, default "1 2": DP=1, then DP=2 on
# the internal back end, one API process per core; "2a1": DP=2 under one API process; "2r": DP=2 through the
# router); STEP=fn: the fused all-reduce + add + RMSNorm kernel (MESHSERVE_TP_FUSED_NORM): its 2-GPU test,
# bench all-reduce, W1 8B at TP = 2 without it, with it (pull); STEP=fn2: W1 8B TP = 2 push and TP = 1;
# STEP=fnt: the tp2-fused-norm layout tests (tokens = one GPU, bf16 = unfused TP = 2). Results under $OUT.
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
MS="python3 -m meshserve.cli"
# run_logged NAME LIMIT_S ARGS...: a meshserve command with its log in $OUT/NAME.log; past LIMIT_S every
# python process prints its stacks (faulthandler on SIGABRT) and the run is killed
run_logged() {
  local name=$1 limit=$2; shift 2
  PYTHONFAULTHANDLER=1 MESHSERVE_WORKER_LOG=INFO $MS --log-level INFO "$@" > "$OUT/$name.log" 2>&1 &
  local pid=$! t0=$SECONDS
  while kill -0 $pid 2>/dev/null && (( SECONDS - t0 < limit )); do sleep 1; done
  if kill -0 $pid 2>/dev/null; then
    echo "== $name: still running after $limit s; stacks in its log"
    pkill -ABRT -f "multiprocessing.spawn"; kill -ABRT $pid; sleep 3
    pkill -9 -f "multiprocessing.spawn"; kill -9 $pid 2>/dev/null
  fi
  wait $pid; echo "== $name: rc $? after $(( SECONDS - t0 )) s"
  grep -v -i "warn" "$OUT/$name.log" | tail -${TAIL:-22}
}
case "${STEP:-a}" in
a)
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
  nvidia-smi topo -m | head -5
  timeout 120 $MS bench all-reduce -tp 2 --output-json $OUT/all_reduce.json 2>&1 | tee $OUT/all_reduce.log
  timeout 420 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/gpu/test_multi_gpu.py -k "${TESTS:-llama}" 2>&1 | tail -30 | tee $OUT/pytest.log
  ;;
b)
  for layout in "-tp 1" "-tp 2" "-tp 2 --disable-custom-all-reduce"; do
    timeout 200 $MS bench latency --model llama-3.1-8b --no-baseline $layout --output-json "$OUT/w1_8b${layout// /_}.json" 2>&1 | grep -v Warning | tail -16
  done
  ;;
c)
  timeout 300 $MS bench latency --model llama-3.1-70b --no-baseline -tp 2 --curve 1,32 --max-model-len 4096 --output-json $OUT/w1_70b_tp2.json 2>&1 | tail -20
  for layout in "-tp 1" "-pp 2"; do
    timeout 200 $MS bench throughput --model llama-3.1-8b --no-baseline $layout --output-json "$OUT/w2_8b${layout// /_}.json" 2>&1 | tail -16
  done
  ;;
d)
  run_logged w1_8b_tp2 150 bench latency --model llama-3.1-8b --no-baseline -tp 2 --output-json $OUT/w1_8b_tp2.json
  run_logged w1_8b_tp2_nccl 120 bench latency --model llama-3.1-8b --no-baseline -tp 2 --disable-custom-all-reduce \
    --output-json $OUT/w1_8b_tp2_nccl.json
  ;;
e)
  run_logged w1_8b_tp2 100 bench latency --model llama-3.1-8b --no-baseline -tp 2 --output-json $OUT/w1_8b_tp2.json
  ;;
f)
  # one device call: W1 8B at TP = 2 (one-shot), TP = 1 and TP = 2 (NCCL), then 70B at TP = 2, batch 1 and 32
  run_logged w1_8b_tp2 100 bench latency --model llama-3.1-8b --no-baseline -tp 2 --output-json $OUT/w1_8b_tp2.json
  run_logged w1_8b_tp1 80 bench latency --model llama-3.1-8b --no-baseline -tp 1 --output-json $OUT/w1_8b_tp1.json
  run_logged w1_8b_tp2_nccl 100 bench latency --model llama-3.1-8b --no-baseline -tp 2 --disable-custom-all-reduce \
    --output-json $OUT/w1_8b_tp2_nccl.json
  run_logged w1_70b_tp2 200 bench latency --model llama-3.1-70b --no-baseline -tp 2 --curve 1,32 --max-model-len 4096 \
    --output-json $OUT/w1_70b_tp2.json
  ;;
p)
  # step profiles (MESHSERVE_PROFILE_DIR) of W1 8B at TP = 2 and TP = 1: where a decode step's time goes; one
  # archive (a call brings back at most 8 files); then TP = 2 on NCCL alone, whose teardown used to abort
  MESHSERVE_PROFILE_DIR=/tmp/prof/tp2 run_logged prof_w1_8b_tp2 100 bench latency --model llama-3.1-8b --no-baseline -tp 2
  MESHSERVE_PROFILE_DIR=/tmp/prof/tp1 run_logged prof_w1_8b_tp1 80 bench latency --model llama-3.1-8b --no-baseline -tp 1
  tar czf $OUT/prof.tgz -C /tmp prof
  TAIL=6 run_logged w1_8b_tp2_nccl 100 bench latency --model llama-3.1-8b --no-baseline -tp 2 --disable-custom-all-reduce
  ;;
dp)
  # W3 with targets through `serve --data-parallel-size 2` (one engine core per GPU under one API front end, or
  # the router with one replica per GPU) beside one replica, back to back; each run's files (tools/w3_slo.sh)
  # go into one archive (a call brings back at most 8 files)
  runs=${DP_RUNS:-1 2}
  for run in $runs; do
    case $run in
      1) flags="--data-parallel-size 1" ;;
      2) flags="--data-parallel-size 2" ;;
      2a1) flags="--data-parallel-size 2 --api-server-count 1" ;;
      2r) flags="--data-parallel-size 2 --data-parallel-backend router" ;;
      *) echo "unknown DP run $run"; continue ;;
    esac
    mkdir -p /tmp/w3_dp$run
    OUT=/tmp/w3_dp$run timeout 280 bash tools/w3_slo.sh ${QPS:-64,128} $flags > /tmp/w3_dp$run/run.log 2>&1
    echo "== W3 DP run $run ($flags): rc $?"; grep -v -i warn /tmp/w3_dp$run/w3.txt 2>/dev/null | tail -12
    # a run cut by its timeout leaves the server and its spawned engine cores (their command lines say
    # multiprocessing.spawn, not meshserve)
    pkill -TERM -f "meshserve.cli serve"; sleep 5; pkill -9 -f "meshserve.cli"; pkill -9 -f "multiprocessing.spawn"
  done
  tar czf $OUT/w3_dp.tgz -C /tmp $(for run in $runs; do echo w3_dp$run; done)
  ;;
g)
  # W2 8B at PP = 2 beside TP = 1 and TP = 2, then the multi-GPU correctness tests
  run_logged w2_8b_tp1 120 bench throughput --model llama-3.1-8b --no-baseline -tp 1 --output-json $OUT/w2_8b_tp1.json
  run_logged w2_8b_pp2 150 bench throughput --model llama-3.1-8b --no-baseline -pp 2 --output-json $OUT/w2_8b_pp2.json
  run_logged w2_8b_tp2 120 bench throughput --model llama-3.1-8b --no-baseline -tp 2 --output-json $OUT/w2_8b_tp2.json
  timeout 180 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/gpu/test_multi_gpu.py -k "${TESTS:-llama}" \
    > $OUT/pytest.log 2>&1; echo "== pytest rc $?"; tail -30 $OUT/pytest.log
  ;;
pp)
  # PP = 2 stage graphs: the PP GPU tests first (tokens = one GPU, graphs replayed on both stages, bf16
  # batch 1), then W2 8B at TP = 1 beside PP = 2 with one step per stage in flight and with three
  timeout 240 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/gpu/test_multi_gpu.py -k "${TESTS:-pp and qwen}" \
    > $OUT/pytest_pp.log 2>&1; echo "== pytest rc $?"; tail -20 $OUT/pytest_pp.log
  run_logged w2_8b_tp1 120 bench throughput --model llama-3.1-8b --no-baseline -tp 1 --output-json $OUT/w2_8b_tp1.json
  run_logged w2_8b_pp2 120 bench throughput --model llama-3.1-8b --no-baseline -pp 2 --output-json $OUT/w2_8b_pp2.json
  run_logged w2_8b_pp2_d3 120 bench throughput --model llama-3.1-8b --no-baseline -pp 2 --pipeline-depth 3 \
    --output-json $OUT/w2_8b_pp2_d3.json
  # each step in flight holds up to max_num_seqs sequences (3 x 256 run at depth 3): SEQS="128 192" adds
  # depth-3 runs at smaller per-step batches; PART=17,15 one with that many layers per stage (the last stage
  # also runs the LM head, ~2.4 layers of weights, and the sampler); PROFILE=1 a torch.profiler window of
  # the depth-3 run (prof.tgz)
  if [ -n "${PART:-}" ]; then
    run_logged w2_8b_pp2_d3_part 120 bench throughput --model llama-3.1-8b --no-baseline -pp 2 --pipeline-depth 3 \
      --pp-layer-partition $PART --output-json $OUT/w2_8b_pp2_d3_part.json
  fi
  for seqs in ${SEQS:-}; do
    run_logged w2_8b_pp2_d3_s$seqs 120 bench throughput --model llama-3.1-8b --no-baseline -pp 2 --pipeline-depth 3 \
      --max-num-seqs $seqs --output-json $OUT/w2_8b_pp2_d3_s$seqs.json
  done
  if [ -n "${PROFILE:-}" ]; then
    MESHSERVE_PROFILE_DIR=/tmp/prof/pp2 TAIL=4 run_logged prof_w2_8b_pp2_d3 120 bench throughput --model llama-3.1-8b \
      --no-baseline -pp 2 --pipeline-depth 3
    tar czf $OUT/prof.tgz -C /tmp prof
  fi
  ;;
ho)
  # the PP token hand-off (--pp-token-handoff: the last stage's sampled ids go to the first stage over
  # NCCL, so with three steps in flight each step holds half of W2's 256 sequences and the host's round trip
  # is off the first stage's path): the PP GPU tests (hand-off test included), then W2 8B at TP = 1, PP = 2
  # depth 3 without and with it, and with it at 17,15 layers per stage
  timeout 200 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/gpu/test_multi_gpu.py -k "${TESTS:-pp2 and qwen}" \
    > $OUT/pytest_pp.log 2>&1; echo "== pytest rc $?"; tail -20 $OUT/pytest_pp.log
  run_logged w2_8b_tp1 95 bench throughput --model llama-3.1-8b --no-baseline -tp 1 --output-json $OUT/w2_8b_tp1.json
  run_logged w2_8b_pp2_d3 95 bench throughput --model llama-3.1-8b --no-baseline -pp 2 --pipeline-depth 3 \
    --output-json $OUT/w2_8b_pp2_d3.json
  run_logged w2_8b_pp2_d3_ho 95 bench throughput --model llama-3.1-8b --no-baseline \
    -pp 2 --pipeline-depth 3 --pp-token-handoff --output-json $OUT/w2_8b_pp2_d3_ho.json
  run_logged w2_8b_pp2_d3_ho_part 95 bench throughput --model llama-3.1-8b --no-baseline -pp 2 --pipeline-depth 3 \
    --pp-token-handoff --pp-layer-partition ${PART:-17,15} --output-json $OUT/w2_8b_pp2_d3_ho_part.json
  ;;
fn)
  # a barrier bug hangs rather than fails: every step has its own timeout
  timeout 150 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/kernels/test_triton_all_reduce_norm.py \
    > $OUT/pytest_kernel.log 2>&1; echo "== kernel pytest rc $?"; tail -15 $OUT/pytest_kernel.log
  timeout 120 $MS bench all-reduce -tp 2 --batches 1,4,16,64 --output-json $OUT/all_reduce_norm.json 2>&1 | tail -8
  run_logged w1_8b_tp2 100 bench latency --model llama-3.1-8b --no-baseline -tp 2 --output-json $OUT/w1_8b_tp2.json
  MESHSERVE_TP_FUSED_NORM=pull run_logged w1_8b_tp2_fused_pull 100 bench latency --model llama-3.1-8b --no-baseline \
    -tp 2 --output-json $OUT/w1_8b_tp2_fused_pull.json
  ;;
fn2)
  # the rest of fn's W1 runs (one device call is at most 600 s): push, and TP = 1 for the ratio
  MESHSERVE_TP_FUSED_NORM=push run_logged w1_8b_tp2_fused_push 100 bench latency --model llama-3.1-8b --no-baseline \
    -tp 2 --output-json $OUT/w1_8b_tp2_fused_push.json
  run_logged w1_8b_tp1 80 bench latency --model llama-3.1-8b --no-baseline -tp 1 --output-json $OUT/w1_8b_tp1.json
  ;;
fnt)
  timeout 540 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_multi_gpu.py \
    -k "${TESTS:-fused and llama}" > $OUT/pytest_fused.log 2>&1; echo "== pytest rc $?"; tail -20 $OUT/pytest_fused.log
  ;;
esac
