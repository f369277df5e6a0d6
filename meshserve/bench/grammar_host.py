"""The host's grammar work per decode step, on the CPU: what a batch of constrained rows costs the step loop.

Each step of a batch of B rows under one JSON schema the engine (a) feeds every row's matcher the token it
sampled and (b) fills the next step's B masks. This replays fixed trajectories (each row walks its grammar
with random allowed tokens, seeded, to the end: the answers of a random-weight model) through both ways the
engine has done it, and checks that they give the same masks bit for bit:
- per-row (the reference, and the engine before issue 27's batching): accept_token and
  fill_next_token_bitmask once per row, then the rows concatenated for the copy;
- batched (the engine now): one BitmaskFiller.fill (xgrammar's BatchGrammarMatcher) into a reused [B, words]
  buffer, nothing to concatenate (accept_token stays one call per row: xgrammar's batch_accept_token was
  slower, 0.11 vs 0.09 ms for 64 rows on 2 cores).
It times the host work only (no device): on a GPU that work is on the step's critical path unless it fits
inside the forward it overlaps (engine/core.py _late_masks_hook).

    python -m meshserve.bench.grammar_host --batch 64 [--tokenizer DIR] [--threads 1,2,4] [--output-json F]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from meshserve.bench.serve_structured import data_path
from meshserve.structured.bitmask import bitmask_to_bool, fill_bitmasks
from meshserve.structured.bitmask_filler import BitmaskFiller


@dataclass
class HostStepTimes:
    """Per-step host milliseconds (mean over the replayed steps) of one way of doing the grammar work."""

    way: str
    threads: int | None
    accept_ms: float
    fill_ms: float
    steps: int

    @property
    def total_ms(self) -> float:
        return self.accept_ms + self.fill_ms


def compiled_schema(tokenizer_dir: str | Path, schema: str, vocab_size: int | None = None, eos: int | None = None):
    """The CompiledGrammar of `schema` over the tokenizer's vocabulary, as the engine compiles it."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from meshserve.structured.grammar import compile_structured_outputs
    from meshserve.structured.params import StructuredOutputsParams

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    eos = tok.eos_token_id if eos is None else eos
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size or len(tok), stop_token_ids=[eos])
    return compile_structured_outputs(xgr.GrammarCompiler(info, max_threads=2), StructuredOutputsParams(json=schema))


def trajectories(compiled, batch: int, seed: int = 0, max_len: int = 256) -> list[list[int]]:
    """`batch` token sequences, each its grammar walked with a random allowed token per step until it ends."""
    import xgrammar as xgr

    rng = random.Random(seed)
    vocab = compiled.tokenizer_info.vocab_size
    out = []
    for _ in range(batch):
        matcher, tokens = xgr.GrammarMatcher(compiled), []
        while not matcher.is_terminated() and len(tokens) < max_len:
            allowed = bitmask_to_bool(fill_bitmasks([matcher], vocab), vocab)[0].nonzero().flatten().tolist()
            token = rng.choice(allowed)
            if not matcher.accept_token(token):
                raise RuntimeError(f"the matcher refused token {token} that its own mask allowed")
            tokens.append(token)
        out.append(tokens)
    return out


def replay(compiled, trajs: list[list[int]], threads: int | None = None, check: bool = True) -> list[HostStepTimes]:
    """Replay the trajectories' common steps both ways (the per-row reference, then batched with each thread
    count); with check, assert that every step's masks are equal bit for bit. Returns the timings."""
    import xgrammar as xgr

    vocab = compiled.tokenizer_info.vocab_size
    steps = min(len(t) for t in trajs)  # every row still running: a full batch each step
    batch = len(trajs)
    per_row = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    batched = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    filler = BitmaskFiller(vocab, threads=threads)
    acc = {"row": [0.0, 0.0], "batch": [0.0, 0.0]}
    for s in range(steps):
        tokens = [t[s - 1] for t in trajs] if s else None
        t0 = time.perf_counter()
        if tokens:
            ok = [m.accept_token(tok) for m, tok in zip(per_row, tokens)]
        t1 = time.perf_counter()
        filled = fill_bitmasks(per_row, vocab)  # the engine before: a fill per row, a view per row,
        reference = torch.cat([filled[i : i + 1] for i in range(batch)])  # concatenated for the copy
        t2 = time.perf_counter()
        if tokens:  # one call per row here too: xgrammar's batch_accept_token measured slower (its result list)
            ok_batch = [m.accept_token(tok) for m, tok in zip(batched, tokens)]
        t3 = time.perf_counter()
        masks = filler.fill(batched)
        t4 = time.perf_counter()
        acc["row"][0] += t1 - t0
        acc["row"][1] += t2 - t1
        acc["batch"][0] += t3 - t2
        acc["batch"][1] += t4 - t3
        if check:
            if tokens and ok != ok_batch:
                raise AssertionError(f"step {s}: accept verdicts differ")
            if not torch.equal(reference, masks):
                raise AssertionError(f"step {s}: batched masks differ from the per-row ones")
    return [HostStepTimes("per-row", None, acc["row"][0] / steps * 1e3, acc["row"][1] / steps * 1e3, steps),
            HostStepTimes("batched", filler.threads, acc["batch"][0] / steps * 1e3, acc["batch"][1] / steps * 1e3,
                          steps)]


def copy_wait_ms(rows: int, words: int, busy_ms: float = 20.0, repeats: int = 5) -> dict[str, float]:
    """On a GPU: host milliseconds a non-blocking copy of a [rows, words] int32 mask takes to return while the
    device is busy (a queued matmul loop of about busy_ms), from pageable memory (what the engine copied
    before) and from pinned memory (BitmaskFiller's buffers). A pageable copy that returns only once the
    device is done puts the rest of the host's step (sampling, the next schedule) behind the forward."""
    device = torch.device("cuda")
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    a @ a  # cuBLAS's first call sets itself up: not timed
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    per_matmul = max((time.perf_counter() - t0) / 10, 1e-5)
    n = max(1, int(busy_ms / 1e3 / per_matmul))
    out = {}
    for name, pin in (("pageable", False), ("pinned", True)):
        host = torch.full((rows, words), -1, dtype=torch.int32, pin_memory=pin)
        waits = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            for _ in range(n):
                a @ a
            t0 = time.perf_counter()
            host.to(device, non_blocking=True)
            waits.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        out[f"{name}_ms"] = statistics.median(waits)
    out["busy_ms"] = n * per_matmul * 1e3
    return out


def _vocab_and_eos(tokenizer_dir: str) -> tuple[int | None, int | None]:
    """A model folder's vocabulary size and first EOS id (config.json), else None (the tokenizer's)."""
    config = Path(tokenizer_dir) / "config.json"
    if not config.exists():
        return None, None
    cfg = json.loads(config.read_text())
    eos = cfg.get("eos_token_id")
    return cfg.get("vocab_size"), eos[0] if isinstance(eos, list) else eos


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshserve.bench.grammar_host", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: SmolLM2's, from the embedded GGUF)")
    p.add_argument("--schema", default=data_path("person_schema.json"))
    p.add_argument("--threads", default="1", help="comma-separated thread counts of the batched fill")
    p.add_argument("--repeats", type=int, default=3, help="replays per thread count (the median is reported)")
    p.add_argument("--copy-probe", action="store_true", help="on a GPU: time the mask copy's return too")
    p.add_argument("--output-json", default=None)
    ns = p.parse_args(argv)
    if ns.tokenizer is None:
        from meshserve.bench.structured_model import SMOL_TOKEN_IDS, SMOL_VOCAB_SIZE, write_smol_tokenizer

        tok_dir = write_smol_tokenizer(tempfile.mkdtemp(prefix="smoltok-"))
        compiled = compiled_schema(tok_dir, Path(ns.schema).read_text(), SMOL_VOCAB_SIZE,
                                   SMOL_TOKEN_IDS["eos_token_id"])
    else:
        compiled = compiled_schema(ns.tokenizer, Path(ns.schema).read_text(), *_vocab_and_eos(ns.tokenizer))
    trajs = trajectories(compiled, ns.batch)
    lengths = [len(t) for t in trajs]
    print(f"batch {ns.batch}, answers of {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.1f}), "
          f"vocabulary {compiled.tokenizer_info.vocab_size}; per-step host ms (median of {ns.repeats})")
    rows = []
    for threads in [int(t) for t in ns.threads.split(",")]:
        runs = [replay(compiled, trajs, threads, check=(r == 0)) for r in range(ns.repeats)]
        for k in range(2):
            if k == 0 and rows:
                continue  # the per-row reference once
            pick = sorted((run[k] for run in runs), key=lambda h: h.total_ms)[len(runs) // 2]
            rows.append(pick)
    print("| way | threads | accept ms/step | fill ms/step | total ms/step |")
    print("|---|---|---|---|---|")
    for h in rows:
        print(f"| {h.way} | {h.threads or '-'} | {h.accept_ms:.3f} | {h.fill_ms:.3f} | {h.total_ms:.3f} |")
    probe = None
    if ns.copy_probe and not torch.cuda.is_available():
        print("no GPU here: the copy probe is skipped")
    elif ns.copy_probe:
        probe = copy_wait_ms(ns.batch, (compiled.tokenizer_info.vocab_size + 31) // 32)
        print(f"mask copy [{ns.batch} rows] returns after {probe['pageable_ms']:.3f} ms from pageable memory, "
              f"{probe['pinned_ms']:.3f} ms from pinned, with {probe['busy_ms']:.1f} ms of device work queued")
    if ns.output_json:
        Path(ns.output_json).write_text(json.dumps({
            "batch": ns.batch, "answer_tokens_mean": statistics.mean(lengths), "steps": rows[0].steps,
            "rows": [{**h.__dict__, "total_ms": h.total_ms} for h in rows], "copy_probe": probe}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
