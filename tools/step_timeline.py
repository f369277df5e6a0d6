"""Where W2's wall time goes, step by step: prefill/mixed vs decode steps, batch size, context, host vs device.

usage: python tools/step_timeline.py MODEL [--eager]

Drives the engine's step loop on the full W2 workload and times, for every step, the scheduler, the runner
(batch build + launch, plus the wait for the sampled ids) and the rest (updates, outputs). With async
scheduling the wait belongs to the previous step's launch, so the columns show host time per step. Decode steps are bucketed by batch size with the KV bytes they read, so the effective attention
bandwidth can be compared with the copy bandwidth.
"""

import argparse
import collections
import time

import torch

from meshserve import LLM, SamplingParams
from meshserve.bench.workloads import W2_TEMPERATURE, w2_requests


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false")
    ns = ap.parse_args()
    llm = LLM(model=ns.model, load_format="dummy", dtype="bfloat16", max_model_len=4096, enforce_eager=ns.eager,
              async_scheduling=ns.async_scheduling)
    engine = llm.engine
    llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=4), use_tqdm=False)
    for i, r in enumerate(w2_requests()):
        engine.add_request(str(i), {"prompt_token_ids": r.prompt_token_ids},
                           SamplingParams(temperature=W2_TEMPERATURE, max_tokens=r.max_tokens, ignore_eos=True))
    sched, executor = engine.scheduler, engine.executor
    orig_schedule = sched.schedule
    rec = {"wait": 0.0}

    def schedule():
        t = time.perf_counter()
        out = orig_schedule()
        rec["sched"] = time.perf_counter() - t
        rec["out"] = out
        return out

    def timed(fn, key):
        def wrapper(*args):
            t = time.perf_counter()
            res = fn(*args)
            rec[key] = time.perf_counter() - t
            return res
        return wrapper

    class TimedPending:  # time spent waiting for the GPU when the engine reads a launched step back
        def __init__(self, pending):
            self.pending = pending

        def result(self):
            t = time.perf_counter()
            res = self.pending.result()
            rec["wait"] = time.perf_counter() - t
            return res

    sched.schedule = schedule
    executor.execute = timed(executor.execute, "exec")
    if engine.async_scheduling:
        launch = timed(executor.execute_async, "exec")
        executor.execute_async = lambda out: TimedPending(launch(out))
    mc = engine.config.model_config
    kv_per_token = 2 * mc.hf_config.num_hidden_layers * mc.hf_config.num_key_value_heads * mc.head_dim * 2
    steps = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = 0
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step(finished_only=True)
        total = time.perf_counter() - t
        out = rec["out"]
        decode_only = all(s.num_new_tokens == 1 for s in out.scheduled)
        ctx = sum(s.num_computed_tokens + s.num_new_tokens for s in out.scheduled)
        steps.append((len(out.scheduled), decode_only, sum(s.num_new_tokens for s in out.scheduled), ctx,
                      rec["sched"], rec["exec"] + rec["wait"], total))
        rec["wait"] = 0.0
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    wall = time.perf_counter() - t0
    print(f"{ns.model}: W2 {tokens} output tokens in {wall:.2f} s = {tokens / wall:,.0f} tok/s, {len(steps)} steps")
    mixed = [s for s in steps if s[0] and not s[1]]
    print(f"prefill/mixed steps: {len(mixed)}, {sum(s[6] for s in mixed):.2f} s, "
          f"{sum(s[2] for s in mixed)} tokens")
    buckets = collections.defaultdict(list)
    idle = [s for s in steps if not s[0]]  # async: every running sequence waits for its last token
    print(f"steps with nothing to schedule: {len(idle)}, {sum(s[6] for s in idle):.2f} s")
    for s in steps:
        if s[1] and s[0]:
            buckets[min(256, 1 << (s[0] - 1).bit_length())].append(s)
    print("decode steps by batch bucket: count, total s, ms/step, sched ms, exec ms, other ms, avg ctx, KV TB/s")
    for b in sorted(buckets):
        ss = buckets[b]
        n = len(ss)
        tot = sum(s[6] for s in ss)
        kv = sum(s[3] for s in ss) * kv_per_token
        print(f"  <= {b:3d}: {n:5d} {tot:7.2f} {1e3 * tot / n:7.2f} {1e3 * sum(s[4] for s in ss) / n:6.2f} "
              f"{1e3 * sum(s[5] for s in ss) / n:7.2f} {1e3 * sum(s[6] - s[4] - s[5] for s in ss) / n:6.2f} "
              f"{sum(s[3] / s[0] for s in ss) / n:7.0f} {kv / tot / 1e12:6.2f}")


if __name__ == "__main__":
    main()
