#!/usr/bin/env bash
# On the GPU machine: start `meshserve serve` for a dummy-weight preset, wait for /ready, run a command, stop it.
# usage: tools/device_serve.sh TAG "SERVE FLAGS" "COMMAND"   (logs under $OUT/server_TAG.log)
set -u
tag=$1; flags=$2; cmd=$3
python -m meshserve.cli serve --port 8001 --uvicorn-log-level warning --disable-access-log $flags \
    > "$OUT/server_$tag.log" 2>&1 &
pid=$!
for _ in $(seq 1 180); do curl -sf http://127.0.0.1:8001/ready > /dev/null && break; sleep 1; done
curl -sf http://127.0.0.1:8001/ready > /dev/null || { echo "server $tag never became ready"; tail -20 "$OUT/server_$tag.log"; kill $pid; exit 1; }
bash -c "$cmd"
rc=$?
kill -TERM $pid; wait $pid
exit $rc
