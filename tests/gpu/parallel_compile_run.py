"""One engine start-up in a fresh process (no kernel in memory; TRITON_CACHE_DIR the caller's), then a
W2-like mix under Triton's jit_cache_hook; prints RESULT and a JSON line: the parallel pre-compile passes run
(what, specializations, of which compiled, seconds; and per pass whether its compiles ran in processes and
how many fell back to this process), the builds after start-up, greedy tokens.
Usage: MESHSERVE_PARALLEL_COMPILE=0|1|procs TRITON_CACHE_DIR=/empty-or-not \
       python tests/gpu/parallel_compile_run.py CHECKPOINT"""

from __future__ import annotations

import json
import random
import sys


def main() -> None:
    from meshserve import LLM, SamplingParams
    from meshserve.engine import parallel_warmup
    from tests.conftest import VOCAB
    from tests.gpu.jit_builds import TritonBuilds

    passes, in_processes = [], []
    compile_in_parallel = parallel_warmup.compile_in_parallel

    def recorded(steps, workers, what, processes=False):
        done = compile_in_parallel(steps, workers, what, processes)
        passes.append((what, done.submitted, done.compiled, round(done.seconds, 2)))
        in_processes.append((what, done.processes, done.fallbacks))
        return done

    parallel_warmup.compile_in_parallel = recorded
    llm = LLM(model=sys.argv[1], dtype="bfloat16", device="cuda", max_model_len=20000, max_num_seqs=32,
              max_num_batched_tokens=512, enable_prefix_caching=True, seed=0)
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    with TritonBuilds() as builds:
        # W2's shape (prompts of 100-1024 tokens, a few to 60 new ones, temperature 0.6) beside long prompts
        # that are chunked behind cached tokens and, past the MLA workspace, attended in pieces
        lengths = [rng.randint(100, 1024) for _ in range(24)] + [1500, 9000, 17000]
        params = [SamplingParams(temperature=0.6, max_tokens=rng.randint(5, 60), ignore_eos=True)
                  for _ in lengths]
        llm.generate([{"prompt_token_ids": ids(n)} for n in lengths], params, use_tqdm=False)
        greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        prompts = [{"prompt_token_ids": ids(n)} for n in (1, 17, 300, 700)]
        batch = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        alone = llm.generate(prompts[2:3], greedy, use_tqdm=False)[0].outputs[0].token_ids  # batch-1 decode
    llm.shutdown()
    print("RESULT " + json.dumps({"passes": passes, "in_processes": in_processes, "builds": len(builds.entries),
                                  "report": builds.report(), "tokens": batch, "alone": alone}))


if __name__ == "__main__":
    main()
