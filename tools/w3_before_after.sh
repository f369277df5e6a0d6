#!/usr/bin/env bash
# Issue 17 on the device: W3 through `meshserve serve` with a real (word-level) tokenizer, before and after the
# engine core / front end split, back to back; then `bench host` before and after.
set -u -o pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
NEW=$PWD OLD=$PWD/.before
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date -u
PYTHONPATH=$NEW:/tmp/site python3 -m meshserve.cli bench tokenizer /tmp/tok || exit 1
serve_w3() {  # label source-dir
  (cd /tmp && PYTHONPATH=$2:/tmp/site python3 -c "import meshserve; print('$1 runs', meshserve.__file__)")
  # from /tmp: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
  (cd /tmp && PYTHONPATH=$2:/tmp/site exec python3 -m meshserve.cli serve llama-3.1-8b --load-format dummy --tokenizer /tmp/tok \
    --max-model-len 4096 --port 8000 --disable-access-log) > $OUT/serve_$1.log 2>&1 &
  local pid=$! t0=$(date +%s)
  for i in $(seq 1 400); do
    curl -sf localhost:8000/health >/dev/null && break
    kill -0 $pid 2>/dev/null || { echo "server $1 died"; tail -30 $OUT/serve_$1.log; return 1; }
    sleep 1
  done
  echo "== $1: ready after $(( $(date +%s) - t0 )) s"
  PYTHONPATH=$NEW:/tmp/site timeout 400 python3 -m meshserve.cli bench serve --qps 32,48,64 --no-progress \
    --output-json $OUT/w3_$1.json 2>&1 | tee $OUT/w3_$1.txt
  curl -s localhost:8000/metrics | grep -E "^(meshserve|vllm):(num_requests_running|engine_stats_age|kv_cache)"
  kill -TERM $pid; wait $pid
}
[ "${ONLY:-}" != before ] && serve_w3 after $NEW
serve_w3 before $OLD
for s in before after; do
  src=$NEW; [ $s = before ] && src=$OLD
  echo "== bench host $s"; (cd /tmp && PYTHONPATH=$src:/tmp/site python3 -c "import meshserve; print(meshserve.__file__)" && PYTHONPATH=$src:/tmp/site python3 -m meshserve.cli bench host 2>&1 | tail -4)
done
