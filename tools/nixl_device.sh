#!/usr/bin/env bash
# The nixl connector on the GPU (issue 25): its GPU tests (VRAM registration and a byte-identical read; the GPU
# engine pair over nccl / gloo / nixl) and the KV link alone, nixl vs torch/nccl, GPU pools (bench kv_link).
# Needs the NIXL wheel for the device's Python 3.12 / CUDA 13, made small enough to carry (once, here):
#   bash tools/nixl_device.sh --fetch        -> .whl-nixl/nixl_cu13-*-cp312-*.whl (~28 MiB; device_env.sh installs it)
# then on the device (carry [".whl", ".whl-nixl"]; one call, ~3 min):
#   bash tools/nixl_device.sh
# On nvidia-h200-x2, PRODUCER_DEVICE=cuda:1 puts the producer's pool on the second GPU (torch then uses NCCL).
# Results: $OUT/nixl_pytest.log, $OUT/kv_link_{nixl,torch}.json (+ .log).
set -u -o pipefail
if [ "${1:-}" = "--fetch" ]; then
  cd "$(dirname "$0")/.." || exit 1
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$tmp" "nixl-cu13==${NIXL_VERSION:-1.5.1}" || exit 1
  grep -qxF '/.whl-nixl/' .git/info/exclude 2> /dev/null || echo '/.whl-nixl/' >> .git/info/exclude
  rm -rf .whl-nixl && bash tools/slim_nixl_wheel.sh "$tmp"/nixl_cu13-*.whl .whl-nixl && rm -rf "$tmp"
  exit
fi
. "$(dirname "$0")/device_env.sh"
mkdir -p "$OUT"
python3 -c "from meshserve.disagg.nixl_connector import nixl_api; nixl_api(); print('nixl importable')" || exit 1
timeout -k 10 ${TEST_LIMIT:-300} python3 -m pytest -m gpu -q -p no:cacheprovider \
  tests/disagg/test_nixl_connector.py tests/disagg/test_disagg_gpu.py > "$OUT/nixl_pytest.log" 2>&1
echo "== nixl GPU tests rc $?"; tail -15 "$OUT/nixl_pytest.log"
for c in nixl torch; do
  timeout -k 10 120 python3 -m meshserve.bench.kv_link --connector $c --device cuda --blocks "${BLOCKS:-64}" \
    --pool-blocks "${POOL_BLOCKS:-256}" ${PRODUCER_DEVICE:+--producer-device $PRODUCER_DEVICE} \
    --output "$OUT/kv_link_$c.json" > "$OUT/kv_link_$c.log" 2>&1
  echo "== kv_link $c rc $?"; cat "$OUT/kv_link_$c.json"; grep -i -m3 "error" "$OUT/kv_link_$c.log"
done
