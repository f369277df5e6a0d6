#!/usr/bin/env bash
# Refusal latency under load on the CPU (issue 18): the front-end bench server (FakeEngineCore: 64 slots, one token
# per running request every 20 ms, so its knee is 64 / (128 x 20 ms) = 25 req/s) with a 1 s TTFT target, driven
# past its knee by `meshserve bench serve` (W3 prompts, Poisson), with the light prober of tools/refusal_probe.py
# beside it. `bench serve` prints each refusal kind's latency (429 slo_unattainable: at arrival; 429 slo_shed: from
# the queue); the report splits the server's part and lists the API process's full garbage collections.
# Usage (repo root, venv active, PYTHONPATH=$PWD): bash tools/refusal_cpu.sh [QPS] [PROMPTS] [server flags...]
#   e.g. bash tools/refusal_cpu.sh 60 900 --no-gc-freeze   (results under ${OUT:-/tmp/refusal_cpu})
set -u -o pipefail
qps=${1:-60} n=${2:-900}; shift 2 || shift $#
out=${OUT:-/tmp/refusal_cpu}; port=${PORT:-18433}
mkdir -p "$out"
timeout 900 python tools/refusal_probe.py server "$out/server.json" --port "$port" --step-ms 20 --max-num-seqs 64 \
  --slo-ttft-ms 1000 "$@" > "$out/server.log" 2>&1 &
server=$!
for _ in $(seq 120); do curl -sf "localhost:$port/ready" >/dev/null && break; sleep 1; done
python tools/refusal_probe.py probe "$port" "$(python -c "print($n / $qps)")" 0.05 "$out/probe.json" &
prober=$!
timeout 600 python -m meshserve.cli bench serve --base-url "http://127.0.0.1:$port" --qps "$qps" --num-prompts "$n" \
  --client-procs "${CLIENT_PROCS:-1}" --no-progress --output-json "$out/bench.json" 2>&1 | grep -v "first error"
wait $prober
kill -TERM $(pgrep -P $server) 2>/dev/null; wait $server  # the server itself (timeout's child) drains and writes
python tools/refusal_probe.py report "$out/server.json" "$out/probe.json"
uptime
