"""Baseline of the engine-core -> parent output channel, for the code BEFORE the core/front-end split (cab8192).

Drives the engine's real output path (scheduler, runner._prepare, token bookkeeping, detokenization with the
embedded SmolLM2 tokenizer, RequestState.to_output) with a stand-in executor that "samples" random token ids,
and measures, for each decode step, what core_process.py would put on the mp.Queue:
    ("outputs", outs, num_waiting)
  - bytes of pickle.dumps(msg, HIGHEST_PROTOCOL), pickle time, unpickle time, and the engine.step() time.

Run (from anywhere):
    source /work/main/.venv/bin/activate
    PYTHONPATH=/tmp/before python /tmp/before_channel_bench.py [--batch 256] [--prompt-len 512]
        [--out-len 128] [--repeats 3] [--modes plain,logprobs] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import random
import statistics
import sys
import time


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class RandomTokenExecutor:
    """Stands in for the executor (as meshserve/bench/host_overhead.py does): builds the real flat batch
    with the runner's _prepare, then 'samples' a random token id per sequence (and top-k logprobs if asked)."""

    def __init__(self, runner, rng: random.Random, logprobs_k: int | None):
        self.runner = runner
        self.rng = rng
        self.k = logprobs_k
        self.prepare_s = 0.0

    def execute(self, sched_out):
        from meshserve.engine.model_runner import ModelRunnerOutput, TokenLogprobs

        out = ModelRunnerOutput()
        if sched_out.is_empty:
            return out
        t = time.perf_counter()
        self.runner._prepare(sched_out.scheduled)
        self.prepare_s += time.perf_counter() - t
        rnd = self.rng.randrange
        for s in sched_out.scheduled:
            if not s.do_sample:
                continue
            tok = rnd(100, 20000)
            out.sampled[s.seq_id] = tok
            if self.k:
                top = [tok] + [rnd(100, 20000) for _ in range(self.k - 1)]
                lps = sorted((-self.rng.random() * 5 for _ in range(self.k)), reverse=True)
                out.logprobs[s.seq_id] = TokenLogprobs(token_id=tok, logprob=lps[0], rank=1,
                                                       top_ids=top, top_logprobs=lps)
        return out


def build_engine(batch: int, prompt_len: int, out_len: int):
    from meshserve import LLM

    max_len = prompt_len + out_len + 16
    llm = LLM(max_model_len=max_len, max_num_seqs=batch, hf_overrides={"num_hidden_layers": 1},
              device="cpu", async_scheduling=False,
              num_gpu_blocks_override=batch * (max_len // 16 + 2),
              # all prompts in one prefill step, so all requests decode in lockstep (same output length);
              # no prefix caching, so every repeat does the same work (the repeats reuse the seed-0 prompts)
              max_num_batched_tokens=batch * (prompt_len + 1), enable_prefix_caching=False)
    assert llm.engine.tokenizer is not None, "no tokenizer: the embedded model did not load"
    return llm


def run_once(llm, batch: int, prompt_len: int, out_len: int, logprobs_k: int | None, seed: int = 0):
    from meshserve import SamplingParams

    engine = llm.engine
    random.seed(seed)
    rng = random.Random(seed + 1)
    real_executor = engine.executor
    fake = RandomTokenExecutor(real_executor.runner, rng, logprobs_k)
    engine.executor = fake
    try:
        params = SamplingParams(temperature=0, max_tokens=out_len + 4, ignore_eos=True, logprobs=logprobs_k)
        for _ in range(batch):
            engine.add_request(None, [random.randrange(100, 20000) for _ in range(prompt_len)], params)
        t = time.perf_counter()
        n_prefill = 0
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.seqs.values()):
            engine.step()
            n_prefill += 1
        prefill_s = time.perf_counter() - t

        rows = []
        while True:
            t0 = time.perf_counter()
            outs = engine.step()
            t1 = time.perf_counter()
            msg = ("outputs", outs, 0)
            blob = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
            t2 = time.perf_counter()
            back = pickle.loads(blob)
            t3 = time.perf_counter()
            del back
            out_tokens = len(outs[0].outputs[0].token_ids) if outs else 0
            text_chars = len(outs[0].outputs[0].text) if outs else 0
            rows.append(dict(out_len=out_tokens, n_outs=len(outs), text_chars=text_chars, bytes=len(blob),
                             step_ms=1e3 * (t1 - t0),
                             pickle_ms=1e3 * (t2 - t1), unpickle_ms=1e3 * (t3 - t2)))
            if out_tokens >= out_len or not outs:
                break
        # drain the rest so the engine is empty for the next run
        for rid in list(engine.requests):
            engine.abort_request(rid)
        while engine.has_unfinished_requests() or engine.scheduler.seqs:
            if not engine.step():
                break
    finally:
        engine.executor = real_executor
    gc.collect()
    return dict(prefill_s=prefill_s, prefill_steps=n_prefill, rows=rows)


def summarize(runs, marks=(16, 64, 128), window=2):
    keys = ("bytes", "pickle_ms", "unpickle_ms", "step_ms")
    summary = {}
    # over all decode steps: per-run median/p90, then median across runs
    allsteps = {}
    for k in keys:
        allsteps[k] = {
            "median": statistics.median(statistics.median(r[k] for r in run["rows"]) for run in runs),
            "p90": statistics.median(pct([r[k] for r in run["rows"]], 0.9) for run in runs),
            "mean": statistics.median(statistics.mean(r[k] for r in run["rows"]) for run in runs),
        }
    summary["all_decode_steps"] = allsteps
    summary["n_decode_steps"] = [len(run["rows"]) for run in runs]
    for m in marks:
        at = {}
        for k in keys:
            per_run = []
            for run in runs:
                xs = [r[k] for r in run["rows"] if abs(r["out_len"] - m) <= window]
                if xs:
                    per_run.append(statistics.median(xs))
            at[k] = statistics.median(per_run) if per_run else float("nan")
            at[k + "_runs"] = per_run
        summary[f"at_out_len_{m}"] = at
    summary["prefill_s"] = [run["prefill_s"] for run in runs]
    return summary


def print_summary(name, s):
    print(f"\n=== {name} ===")
    print(f"decode steps per run: {s['n_decode_steps']}, prefill s per run: "
          f"{[round(x, 2) for x in s['prefill_s']]}")
    hdr = f"{'':18s}{'bytes/step':>14s}{'pickle ms':>12s}{'unpickle ms':>13s}{'step ms':>10s}"
    print(hdr)
    a = s["all_decode_steps"]
    for stat in ("median", "p90", "mean"):
        print(f"{'all steps ' + stat:18s}{a['bytes'][stat]:14,.0f}{a['pickle_ms'][stat]:12.2f}"
              f"{a['unpickle_ms'][stat]:13.2f}{a['step_ms'][stat]:10.2f}")
    for key in (k for k in s if k.startswith("at_out_len_")):
        v = s[key]
        print(f"{'out_len ~' + key.rsplit('_', 1)[1]:18s}{v['bytes']:14,.0f}{v['pickle_ms']:12.2f}"
              f"{v['unpickle_ms']:13.2f}{v['step_ms']:10.2f}")
    for key in (k for k in s if k.startswith("at_out_len_")):
        v = s[key]
        print(f"  per-run {key}: pickle {[round(x, 2) for x in v['pickle_ms_runs']]} "
              f"unpickle {[round(x, 2) for x in v['unpickle_ms_runs']]} step {[round(x, 2) for x in v['step_ms_runs']]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="plain,logprobs")
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()

    import meshserve
    print("meshserve from", meshserve.__file__, flush=True)
    t = time.perf_counter()
    llm = build_engine(ns.batch, ns.prompt_len, ns.out_len)
    print(f"engine built in {time.perf_counter() - t:.1f}s; tokenizer={type(llm.engine.tokenizer).__name__}",
          flush=True)

    modes = {"plain": None, "logprobs": 5}
    results = {}
    for name in ns.modes.split(","):
        runs = []
        for rep in range(ns.repeats):
            t = time.perf_counter()
            run = run_once(llm, ns.batch, ns.prompt_len, ns.out_len, modes[name], seed=0)
            runs.append(run)
            last = run["rows"][-1]
            print(f"[{name} rep {rep}] {time.perf_counter() - t:.1f}s, {len(run['rows'])} decode steps, "
                  f"last: {last}", flush=True)
        s = summarize(runs)
        results[name] = {"summary": s, "runs": runs}
        print_summary(f"{name} (logprobs={modes[name]}), batch {ns.batch}, prompt {ns.prompt_len}", s)
        sys.stdout.flush()
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
