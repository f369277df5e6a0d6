# For the device scripts that start servers (sourced: `. "$(dirname "$0")/serve_procs.sh"`): their environment
# (the device's or DRY=1's), the host's facts for a results folder's env.txt, and process control (every server in its own process group, setsid, ended by its group
# id).
#
# script_env DRY_OUT: DRY=1 (the CPU box): the repository root as working directory, unbuffered offline Python,
# PYTHONPATH the checkout, OUT DRY_OUT unless set; else device_env.sh (the device: its carried wheels, OUT)
script_env() {
  if [ "${DRY:-0}" = 1 ]; then
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
    OUT=${OUT:-$1}
  else
    . "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
  fi
}
# host_facts: "key value" lines (date, cpu, cores, load, python, the router's source sha1, httptools / uvloop, git)
host_facts() {
  echo "date $(date -u +%FT%TZ)"
  echo "cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "cores $(nproc) (online $(getconf _NPROCESSORS_ONLN))"
  echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "python $(python3 -c 'import sys; print(sys.version.split()[0])')"
  echo "router_source_sha1 $(cat meshserve/router/*.py | sha1sum | cut -c1-12)"
  # the router's relay and uvicorn take httptools / uvloop where installed (httpx's and h11's pure Python else:
  # the device image has neither unless carried; the 2026-12-04 (thirty-fourth session) rows ran without them)
  echo "fast_http $(python3 -c 'import httptools, uvloop; print("httptools", httptools.__version__, "uvloop", uvloop.__version__)' 2> /dev/null || echo none)"
  echo "git $(git rev-parse --short HEAD 2> /dev/null || echo unknown)"
}
#
# kill_group PID: SIGTERM to the server (it drains; its engine core follows), up to 25 s for it and 5 s more for
# the rest of its process group, then SIGKILL to whatever of the group is left (the GPU's memory with it)
kill_group() {
  local pid=$1
  [ -z "$pid" ] && return 0
  kill -TERM "$pid" 2> /dev/null
  for _ in $(seq 1 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
  kill -KILL "$pid" 2> /dev/null
  # the group setsid made (its id the server's pid): an engine core left behind
  for _ in $(seq 1 10); do kill -0 -- "-$pid" 2> /dev/null || return 0; sleep 0.5; done
  echo "process group $pid still there: SIGKILL"
  kill -KILL -- "-$pid" 2> /dev/null; sleep 1
  return 0
}
# wait_ready PORT PID LIMIT: /health and /v1/models answer within LIMIT s, and PID is alive
wait_ready() {
  local port=$1 pid=$2 limit=$3 t=$SECONDS
  while (( SECONDS - t < limit )); do
    kill -0 "$pid" 2> /dev/null || { echo "pid $pid died"; return 1; }
    curl -sf -m 5 "127.0.0.1:$port/health" > /dev/null && curl -sf -m 5 "127.0.0.1:$port/v1/models" > /dev/null \
      && return 0
    sleep 1
  done
  echo "port $port not ready after $limit s"; return 1
}
