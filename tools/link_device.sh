#!/usr/bin/env bash
# Issue 25's KV link on one H200 (~4 min): the block-copy kernel's GPU tests, its tile sweep
# (tools/sweep_block_copy.py: device time per tile), then kv_link's ipc pulls (two processes on the GPU, Llama-3.1-8B
# blocks, 32 layers) at 16 / 256 / 512 blocks with the default tile and at 256 / 512 with the sweep's fastest tile
# of the largest read, and with the pull naming the producer's blocks (--ids-ahead: the read beside the grant's
# round trip), each with whole reads replayed from a CUDA graph (the default) and launched (MESHSERVE_IPC_READ_GRAPH=0).
# Each pull's split: reply (the wait for the producer's answer), read = plan + launch (or replay) + the copy's wait,
# gpu (the launch's or replay's device time), ack. Results under $OUT/link/.
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
mkdir -p $OUT/link
timeout ${TEST_LIMIT:-200} python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_triton_block_copy.py 2>&1 | tail -2
if [ "${SWEEP:-1}" = 1 ]; then  # (SWEEP=0: the pulls alone, the default tile)
  python3 tools/sweep_block_copy.py $OUT/link/sweep.json --blocks ${BLOCKS:-16,256,512} 2>&1 | grep -v -i warn
fi
pull() {  # name, blocks, then the environment
  local name=$1 blocks=$2; shift 2
  env "$@" python3 -m meshserve.bench.kv_link --connector ipc --device cuda --blocks $blocks --pool-blocks 2048 ${IDS_AHEAD:+--ids-ahead} \
    --repeat ${REPEAT:-20} --output $OUT/link/$name.json > $OUT/link/$name.log 2>&1 || { tail -3 $OUT/link/$name.log; return; }
  python3 - $OUT/link/$name.json "$*" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ms = " ".join(f"{k[:-9]} {r[k] * 1e3:.3f}" for k in r if k.endswith("_median_s"))
print(f"{r['blocks']} blocks{' ids ahead' * r['ids_ahead']} {sys.argv[2]}: {r['median_GBps']:.1f} GB/s ({100 * r['fraction_of_copy']:.1f}% of copy "
      f"{r['copy_GBps']:.0f}; best {r['best_GBps']:.1f}); ms: {ms}")
PY
}
for b in 16 256 512; do pull ipc_$b $b; done
for b in 16 256 512; do IDS_AHEAD=1 pull ipc_${b}_ahead $b; done
# whole reads replay a CUDA graph by default (kernels/block_copy_graph.py); launched as before, for the A/B
for b in 16 256 512; do IDS_AHEAD=1 pull ipc_${b}_ahead_launched $b MESHSERVE_IPC_READ_GRAPH=0; done
[ -f $OUT/link/sweep.json ] || exit 0
best=$(python3 -c "import json; r = json.load(open('$OUT/link/sweep.json'))['results'][-1]['fastest'][0]['tile']; print(','.join(map(str, r)))")
for b in 256 512; do pull ipc_${b}_best $b MESHSERVE_BLOCK_COPY_TILE=$best; done
