"""Differential fuzz of the engine's features against its plain path, on CPU (tiny random checkpoints).

Each seed draws a workload (10-40 requests: prompts of 1-200 tokens, some on shared prefixes or repeated, max_tokens
1-40, greedy, some with stop_token_ids / min_tokens / ignore_eos / n=2, seeded sampling, priorities) and runs it on
the plain configuration (no prefix caching, chunked prefill or async scheduling, a large pool) and under random
combinations of: block sizes, pools small enough to preempt, max_num_seqs 1-4, a few tokens a step with chunked
prefill, prefix caching, async scheduling, priority scheduling, n-gram or draft-model speculation, CPU / disk KV
offload with each preemption mode, and (--parallel) TP=2 or PP=2 on gloo. Every completion's token ids, finish
reason and stop reason must equal the plain run's (seeded sampled ones too, except under speculation, whose draws
README.md says may differ), unless the plain path's own logprobs of the two diverging tokens lie within 1e-4 (a
near-tie that fp32 summation order flips: TP's all-reduce, another batch shape; logged as near_tie with the gap,
ok). One JSON line a run on stdout and in --log; a run past --hang seconds dumps its stack
and exits. tests/engine/test_feature_combinations.py is CI's fixed-seed slice of the same idea (its own workloads,
with logprobs and penalties); this is the long run, with priorities, repeated prompts, draft models, disk
tiers and parallel layouts. Found with it (2026-12-05, 1,126 runs): a draft model's lookahead slots missing
from the KV fit checks (a hang) and its pool's CPU cap counted twice.

usage: python tools/fuzz_engine.py --family FAMILY --seeds 0-9 --combos 3 [--hard] [--parallel]
       [--only JSON] [--shared-disk DIR] [--workdir DIR]
FAMILY: llama, qwen3, llama_tied, or any other family of tests/conftest.py (MoE: mixtral, qwen2_moe, qwen3_moe, and
deepseek_v2 / deepseek_v3 with MLA attention; for these --parallel also draws expert parallel over the TP pair).
Each (seed, combo index) reproduces: the workload comes from the seed, the combination from (seed, index);
--only JSON runs one combination of engine kwargs instead (a failure's `kw`).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import sys
import time
import traceback

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone, for tests.conftest's checkpoints
import torch  # noqa: E402

torch.set_num_threads(2)
from meshserve import LLM, SamplingParams  # noqa: E402
from tests.conftest import FAMILIES as CHECKPOINT_FAMILIES  # noqa: E402
from tests.conftest import VOCAB, make_tiny_checkpoint  # noqa: E402

WORKDIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "meshserve-fuzz")  # checkpoints, disk tiers (--workdir)
MAX_MODEL_LEN = 256
COMMON = dict(device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0)
PLAIN = dict(enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=4096,
             async_scheduling=False, block_size=16)
FAMILIES = {"llama": {}, "qwen3": {}, "llama_tied": {"family": "llama", "tie_word_embeddings": True}}
# checkpoints with experts (their configs route tokens): --parallel draws expert parallel over the TP pair for them too
MOE_FAMILIES = tuple(name for name, cfg in CHECKPOINT_FAMILIES.items() if "num_experts_per_tok" in cfg)


def ckpt(name: str) -> str:
    path = os.path.join(WORKDIR, "ckpt", name)
    if not os.path.exists(os.path.join(path, "config.json")):
        if name not in FAMILIES and name not in CHECKPOINT_FAMILIES and name != "draft":
            sys.exit(f"unknown family {name!r}: one of {sorted(set(FAMILIES) | set(CHECKPOINT_FAMILIES))}")
        kw = dict(FAMILIES.get(name, {}))
        fam = kw.pop("family", name)
        if name == "draft":
            fam, kw = "llama", {"seed": 7, "num_hidden_layers": 1, "tie_word_embeddings": True}
        os.makedirs(path, exist_ok=True)
        make_tiny_checkpoint(path, fam, **kw)
    return path


def make_workload(seed: int):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(8, 150))] for _ in range(3)]
    reqs = []
    for _ in range(rng.randint(10, 40)):
        length = rng.randint(1, 200)
        head = rng.choice(prefixes)[:length] if rng.random() < 0.4 else []
        prompt = head + [rng.randrange(3, VOCAB) for _ in range(length - len(head))]
        if rng.random() < 0.15 and reqs:  # an exact duplicate of an earlier prompt (full prefix hit)
            prompt = list(rng.choice(reqs)[0])
        mt = rng.randint(1, 40)
        p = dict(max_tokens=mt, temperature=0.0)
        if rng.random() < 0.25:
            p["stop_token_ids"] = rng.sample(range(3, VOCAB), 12)
        if rng.random() < 0.2:
            p["min_tokens"] = rng.randint(1, mt)
        if rng.random() < 0.3:
            p["ignore_eos"] = True
        if rng.random() < 0.15:
            p.update(n=2, temperature=rng.uniform(0.5, 1.2), seed=rng.randrange(2**31))
        elif rng.random() < 0.1:
            p.update(n=2)  # greedy n=2: both completions equal
        reqs.append((prompt, p, rng.randint(0, 3)))
    return reqs


def combo_hard(seed: int, idx: int, family: str):
    """Everything near its edge: the smallest pools, budgets of a few tokens, long proposals."""
    rng = random.Random(seed * 1000 + idx + 500)
    bs = rng.choice([1, 2, 4, 8, 16, 32])
    k = rng.randint(1, 8)
    need = -(-(240 + k) // bs) + 1
    c = dict(block_size=bs, num_gpu_blocks_override=need + rng.randint(0, need // 3),
             max_num_seqs=rng.randint(1, 4), enable_chunked_prefill=True,
             max_num_batched_tokens=rng.choice([1, 2, 3, 5, 8, 16, 64]),
             enable_prefix_caching=rng.random() < 0.7, async_scheduling=rng.random() < 0.6)
    if rng.random() < 0.3:
        c["scheduling_policy"] = "priority"
    r = rng.random()
    if r < 0.4:
        c["speculative_config"] = {"method": "ngram", "num_speculative_tokens": k,
                                   "prompt_lookup_min": 1, "prompt_lookup_max": rng.randint(1, 5)}
    elif r < 0.6:
        c["speculative_config"] = {"method": "draft_model", "model": ckpt("draft"),
                                   "num_speculative_tokens": min(k, 5)}
    if rng.random() < 0.5:
        c.update(kv_offloading_size=0.05, kv_offloading_verify=True,
                 preemption_mode=rng.choice(["recompute", "swap", "auto"]))
        if rng.random() < 0.4:
            c.update(kv_offloading_disk_path=os.path.join(WORKDIR, f"hdisk-{family}-{seed}-{idx}"), kv_offloading_disk_size=0.1)
    return c


def combo(seed: int, idx: int, family: str, parallel: bool, hard: bool = False):
    if hard:
        return combo_hard(seed, idx, family)
    rng = random.Random(seed * 1000 + idx)
    c = {}
    bs = rng.choice([4, 8, 16])
    c["block_size"] = bs
    if rng.random() < 0.6:  # tiny pool: 240 tokens max per request
        need = -(-240 // bs) + 2
        c["num_gpu_blocks_override"] = need + rng.randint(0, need)
    if rng.random() < 0.6:
        c["max_num_seqs"] = rng.randint(1, 4)
    if rng.random() < 0.5:
        c.update(enable_chunked_prefill=True, max_num_batched_tokens=rng.choice([8, 16, 32, 64]))
    c["enable_prefix_caching"] = rng.random() < 0.6
    c["async_scheduling"] = rng.random() < 0.5
    if rng.random() < 0.3:
        c["scheduling_policy"] = "priority"
    spec = rng.random()
    if spec < 0.25:
        c["speculative_config"] = {"method": "ngram", "num_speculative_tokens": rng.randint(1, 4),
                                   "prompt_lookup_min": 1, "prompt_lookup_max": rng.randint(1, 4)}
    elif spec < 0.4:
        c["speculative_config"] = {"method": "draft_model", "model": ckpt("draft"),
                                   "num_speculative_tokens": rng.randint(1, 3)}
    if parallel:
        if rng.random() < 0.5:
            c["tensor_parallel_size"] = 2
            if family in MOE_FAMILIES and rng.random() < 0.5:
                c["enable_expert_parallel"] = True
        else:
            c["pipeline_parallel_size"] = 2
            c["async_scheduling"] = True
            c.pop("speculative_config", None)  # refused under PP (a clean InvalidArgumentError), not a finding
            if rng.random() < 0.3:
                c["pipeline_depth"] = 3
            if rng.random() < 0.25:
                c["pp_token_handoff"] = True
    else:
        off = rng.random()
        if off < 0.35:
            c.update(kv_offloading_size=0.05, kv_offloading_verify=True)
            if rng.random() < 0.4:
                c.update(kv_offloading_disk_path=os.path.join(WORKDIR, f"disk-{family}-{seed}-{idx}"),
                         kv_offloading_disk_size=0.1)
            c["preemption_mode"] = rng.choice(["recompute", "swap", "auto"])
    return c


def run(path, workload, kw):
    llm = LLM(model=path, **{**COMMON, **kw})
    try:
        prompts = [{"prompt_token_ids": p} for p, _, _ in workload]
        params = [SamplingParams(**p) for _, p, _ in workload]
        extra = {}
        if kw.get("scheduling_policy") == "priority":
            extra["priority"] = [pr for _, _, pr in workload]
        t = time.time()
        outs = llm.generate(prompts, params, use_tqdm=False, **extra)
        stats = llm.engine.stats() if hasattr(llm.engine, "stats") else {}
        return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs], stats, time.time() - t
    finally:
        llm.shutdown()


def compare(workload, plain, other, seeded_too):
    bad = []
    for i, ((prompt, p, _), w, g) in enumerate(zip(workload, plain, other)):
        if p.get("temperature", 0) > 0 and not seeded_too:
            continue
        if [tuple(map(tuple, x[:1])) + tuple(x[1:]) for x in w] != [tuple(map(tuple, x[:1])) + tuple(x[1:]) for x in g]:
            bad.append((i, len(prompt), p, w, g))
    return bad


NEAR_TIE = 1e-4  # a greedy pick this close to the runner-up is fp32 summation order, not a fault


def tie_gap(path, prompt, p, want, got):
    """For a greedy mismatch: how far apart the plain path's logprobs of the two diverging tokens are at the first
    position where the completions part (None when they do not part at a token: a finish or stop reason)."""
    if p.get("temperature", 0) > 0:
        return None
    for (w_ids, *_), (g_ids, *_) in zip(want, got):
        k = next((i for i, (a, b) in enumerate(zip(w_ids, g_ids)) if a != b), None)
        if k is not None:
            break
    else:
        return None
    llm = LLM(model=path, **{**COMMON, **PLAIN})
    try:
        out = llm.generate([{"prompt_token_ids": list(prompt) + list(w_ids[:k])}],
                           SamplingParams(max_tokens=1, temperature=0.0, logprobs=20), use_tqdm=False)
    finally:
        llm.shutdown()
    lp = out[0].outputs[0].logprobs[0]
    if w_ids[k] not in lp or g_ids[k] not in lp:
        return None
    return lp[w_ids[k]].logprob - lp[g_ids[k]].logprob


def main():
    global WORKDIR
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="llama")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--combos", type=int, default=3)
    ap.add_argument("--only", default=None, help="JSON of engine kwargs (replaces the random combos)")
    ap.add_argument("--parallel", action="store_true")
    ap.add_argument("--hard", action="store_true")
    ap.add_argument("--shared-disk", default=None, help="every disk tier uses this folder (files of other runs)")
    ap.add_argument("--hang", type=int, default=300)
    ap.add_argument("--workdir", default=WORKDIR)
    ap.add_argument("--log", default=None, help="JSON lines of every run (default: WORKDIR/log.jsonl)")
    a = ap.parse_args()
    WORKDIR = a.workdir
    os.makedirs(WORKDIR, exist_ok=True)
    log = a.log or os.path.join(WORKDIR, "log.jsonl")
    lo, _, hi = a.seeds.partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    path = ckpt(a.family)
    for seed in seeds:
        workload = make_workload(seed)
        faulthandler.dump_traceback_later(a.hang, exit=True)
        plain, _, tp = run(path, workload, PLAIN)
        combos = [json.loads(a.only)] if a.only else [combo(seed, i, a.family, a.parallel, a.hard) for i in range(a.combos)]
        for i, kw in enumerate(combos):
            if a.shared_disk and "kv_offloading_disk_path" in kw:
                kw["kv_offloading_disk_path"] = a.shared_disk
            full = {**PLAIN, **kw}
            faulthandler.dump_traceback_later(a.hang, exit=True)
            rec = dict(family=a.family, seed=seed, idx=i, kw=kw)
            try:
                other, stats, t = run(path, workload, full)
                seeded = "speculative_config" not in kw
                bad = compare(workload, plain, other, seeded)
                gaps = [tie_gap(path, workload[b[0]][0], b[2], b[3], b[4]) for b in bad[:3]]
                # every mismatch a near-tie of the plain path's own logits: rounding, logged apart from findings
                ties = bool(bad) and len(bad) <= 3 and all(g is not None and abs(g) < NEAR_TIE for g in gaps)
                rec.update(ok=not bad or ties, near_tie=ties, n=len(workload), t=round(t, 1),
                           preempt=stats.get("num_preemptions"),
                           mism=[dict(i=b[0], plen=b[1], p=b[2], gap=g, want=b[3], got=b[4])
                                 for b, g in zip(bad[:3], gaps)], nbad=len(bad))
            except Exception as e:
                rec.update(ok=False, crash=f"{type(e).__name__}: {e}", tb=traceback.format_exc()[-3000:])
            print(json.dumps({k: v for k, v in rec.items() if k not in ("tb",)})[:1500], flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
        faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
