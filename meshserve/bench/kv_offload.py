"""KV offload on the device: time to first token of a revisited long history, recomputed vs restored.

`python -m meshserve.bench.kv_offload --model llama-3.1-8b` (dummy weights, bf16). For each configuration
(no offload; CPU tier; a small CPU tier in front of a disk tier; that disk tier after a restart) it warms up,
prefills a history of --history token ids (`random.seed(26)`), pushes it out of the GPU pool with --fillers other
histories of the same length, then sends the history plus 32 new ids with max_tokens 1 and times it. Prints one
JSON line per configuration (TTFT of the first visit and of the revisit, the offload counters) and the ratio.
With offload it also reports copy/compute overlap: the copy stream's busy time (each step's offload copies,
device-timed) and how much of it fell inside the compute stream's forwards (`copy_overlap_frac`).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time


def _histories(length: int, count: int) -> list[list[int]]:
    random.seed(26)
    return [[random.randint(0, 10000) for _ in range(length)] for _ in range(count)]


def _ttft(llm, ids: list[int]) -> float:
    from meshserve import SamplingParams

    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                 use_tqdm=False)
    return time.perf_counter() - t0


class OverlapTrace:
    """Device-timed intervals of the copy stream's work (transfer.py's trace) and of the compute stream's
    forwards; the overlap is the copy time spent while a forward ran."""

    def __init__(self, runner):
        import torch

        self.base = torch.cuda.Event(enable_timing=True)
        self.base.record()
        self.compute: list = []
        runner.kv_transfer.trace = self.copy = []
        forward = runner._run_forward

        def timed_forward(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = forward(*args, **kwargs)
            end.record()
            self.compute.append((start, end))
            return out

        runner._run_forward = timed_forward

    def _ms(self, pairs, key) -> list[tuple[float, float]]:
        return [(self.base.elapsed_time(key(a)), self.base.elapsed_time(key(b))) for a, b in pairs]

    def report(self) -> dict:
        import torch

        torch.cuda.synchronize()
        copy = self._ms(self.copy, lambda e: e.event)
        compute = self._ms(self.compute, lambda e: e)
        busy = sum(b - a for a, b in copy)
        overlap = sum(max(0.0, min(b, d) - max(a, c)) for a, b in copy for c, d in compute)
        return {"copy_busy_ms": round(busy, 3), "copy_overlap_ms": round(overlap, 3),
                "copy_overlap_frac": round(overlap / busy, 3) if busy else None}


def run_config(ns, name: str, revisit_only: bool = False, **offload) -> dict:
    import torch

    from meshserve import LLM

    llm = LLM(model=ns.model, load_format="dummy", dtype="bfloat16", max_model_len=ns.history + 128,
              num_gpu_blocks_override=ns.gpu_blocks, max_num_seqs=8, **offload)
    history, *fillers = _histories(ns.history, 1 + ns.fillers)
    _ttft(llm, [1, 2, 3])  # warm-up
    runner = llm.engine.core.executor.runner
    # device-timed: on CUDA only (a CPU dry run of this script has no events to time with)
    has_transfer = getattr(runner, "kv_transfer", None) is not None
    trace = OverlapTrace(runner) if has_transfer and torch.cuda.is_available() else None
    first = None
    if not revisit_only:
        first = _ttft(llm, history)
        for filler in fillers:
            _ttft(llm, filler)
    extra = [random.Random(7).randint(0, 10000) for _ in range(32)]
    revisit = _ttft(llm, history + extra)
    stats = llm.engine.stats()
    overlap = trace.report() if trace is not None else {}
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    row = {"config": name, "history_tokens": ns.history, "ttft_first_s": first, "ttft_revisit_s": round(revisit, 4),
           "cached_hit_rate": stats["prefix_cache_hit_rate"]}
    row.update({k: v for k, v in stats.items() if k.startswith("kv_offload") and v})
    row.update(overlap)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--history", type=int, default=16384)
    ap.add_argument("--fillers", type=int, default=3)
    ap.add_argument("--gpu-blocks", type=int, default=1400, help="GPU pool in blocks of 16 tokens")
    ap.add_argument("--cpu-gib", type=float, default=16.0, help="the CPU tier of the cpu configuration")
    ap.add_argument("--staging-cpu-gib", type=float, default=3.0, help="the CPU tier in front of the disk")
    ap.add_argument("--disk-gib", type=float, default=24.0)
    ap.add_argument("--disk-path", default=None)
    ns = ap.parse_args(argv)
    disk_path = ns.disk_path or tempfile.mkdtemp(prefix="meshserve-kv-")
    disk = {"kv_offloading_size": ns.staging_cpu_gib, "kv_offloading_disk_path": disk_path,
            "kv_offloading_disk_size": ns.disk_gib}
    rows = [run_config(ns, "recompute"),
            run_config(ns, "cpu", kv_offloading_size=ns.cpu_gib),
            run_config(ns, "cpu+disk", **disk),
            run_config(ns, "disk after restart", revisit_only=True, **disk)]
    base = rows[0]["ttft_revisit_s"]
    for row in rows:
        row["speedup_vs_recompute"] = round(base / row["ttft_revisit_s"], 2)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
