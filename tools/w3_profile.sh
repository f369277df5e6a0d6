#!/usr/bin/env bash
# Where a past-the-knee W3 step goes (issue 18): W3 at one QPS (default 96) with a torch.profiler window of the
# engine's steps (MESHSERVE_PROFILE_DIR, engine/step_profiler.py), then tools/trace_gaps.py on it: GPU busy
# fraction, idle gaps charged to the engine phase that launched late, kernels by time. Device, repo root, .whl:
#   QPS=96 SKIP=200 STEPS=20 bash tools/w3_profile.sh [extra serve flags]   (~3 min; results in $OUT)
set -u -o pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export MESHSERVE_PROFILE_DIR=/tmp/w3_prof MESHSERVE_PROFILE_SKIP=${SKIP:-200} MESHSERVE_PROFILE_STEPS=${STEPS:-20}
rm -rf $MESHSERVE_PROFILE_DIR
CLIENT_PROCS=${CLIENT_PROCS:-8} bash tools/w3_slo.sh ${QPS:-96} --api-server-count 4 "$@" | tail -25
for f in $MESHSERVE_PROFILE_DIR/rank*.json; do
  [ -f "$f" ] || { echo "no trace written (fewer than SKIP + STEPS steps?)"; break; }
  PYTHONPATH=$PWD:/tmp/site python3 tools/trace_gaps.py "$f" --top 20 | tee $OUT/$(basename $f .json)_gaps.txt
  gzip -c "$f" > $OUT/$(basename $f).gz; cp ${f%.json}.txt $OUT/
done
