#!/usr/bin/env bash
# W2 on one H200 for older trees of meshserve beside this checkout, same machine and call, to find a commit that
# slowed W2. Each tree gets its own Triton cache, cold unless WARM=1 (then one untimed run first): with a shared
# cache the trees compiled by an earlier one ran warm, which is how 2026-11-30's "regression" (Triton compiling
# inside the timed run, BENCHMARKS.md) first looked like one commit's fault. Stage the trees here first (ignored,
# carried as .bisect):  for c in SHA...; do mkdir -p .bisect/$c && git archive $c meshserve | tar -x -C .bisect/$c; done
# A tree's own flags in its file EXTRA (a variant of one commit). MODEL (default qwen3-0.6b); results in $OUT/w2_bisect.tgz, one summary line per tree.
set -u -o pipefail
. "$(dirname "$0")/device_env.sh"
R=/tmp/w2_bisect; mkdir -p $R
MODEL=${MODEL:-qwen3-0.6b}
for tree in $(ls -d .bisect/* 2>/dev/null) .; do
  name=$(basename $(cd $tree && pwd)); [ "$tree" = . ] && name=HEAD
  export TRITON_CACHE_DIR=/tmp/w2_bisect_tc/$name; rm -rf $TRITON_CACHE_DIR
  if [ "${WARM:-0}" = 1 ]; then
    (cd $tree && PYTHONPATH=$PWD:/tmp/site timeout ${LIMIT:-120} python3 -m meshserve.cli bench throughput \
       --model $MODEL --no-baseline ${EXTRA:-} $(cat EXTRA 2>/dev/null)) > $R/${name}_warmup.log 2>&1
  fi
  t0=$SECONDS
  (cd $tree && PYTHONPATH=$PWD:/tmp/site timeout ${LIMIT:-120} python3 -m meshserve.cli bench throughput --model $MODEL \
     --no-baseline --output-json $R/$name.json ${EXTRA:-} $(cat EXTRA 2>/dev/null)) > $R/$name.log 2>&1
  echo "== $name rc $? $((SECONDS - t0)) s: $(grep -E '^seconds|^output_tok_s' $R/$name.log | head -2 | tr -s ' ' | tr '\n' ' ')"
  if [ "${TIMELINE:-0}" = 1 ]; then  # host vs device time per step (this checkout's tool, the tree's engine)
    (cd $tree && PYTHONPATH=$PWD:/tmp/site timeout ${LIMIT:-120} python3 $OLDPWD/tools/step_timeline.py $MODEL) \
      > $R/${name}_timeline.log 2>&1
    echo "   timeline rc $?: $(tail -4 $R/${name}_timeline.log | tr '\n' ' ' | cut -c1-400)"
  fi
done
tar czf $OUT/w2_bisect.tgz -C /tmp w2_bisect
