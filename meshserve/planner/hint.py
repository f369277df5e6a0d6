"""When no layout fits: the largest --max-model-len that would, and the fewest GPUs that hold the full length.

Both are checked by planning again, so a hint is never a guess.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from meshserve.planner.memory import MemoryBreakdown

if TYPE_CHECKING:
    from meshserve.planner.plan import PlanRequest

MAX_NODES = 16  # how far "more GPUs" looks


def _round_len(tokens: int) -> int:
    # A length people would type: a multiple of 1,024 once there is room for one.
    return tokens // 1024 * 1024 if tokens >= 1024 else tokens


def shorter_len_hint(r: PlanRequest, max_len: int, too_big: list[MemoryBreakdown]) -> str:
    """'--max-model-len N' for the largest N (≥ one request of the workload) that fits, or ''."""
    from meshserve.planner.plan import make_plan

    room = max((m.max_kv_tokens for m in too_big), default=0)
    length = min(_round_len(room), max_len - 1)
    if length < r.workload.input_len + r.workload.output_len:
        return ""
    result = make_plan(dataclasses.replace(r, max_model_len=length), hint=False)
    if result.best is None:
        return ""
    best = result.best
    return (f"--max-model-len {length} fits ({best.layout.label}, up to {best.max_concurrency:,} concurrent "
            f"requests of {r.workload.input_len + r.workload.output_len:,} tokens)")


def more_gpus_hint(r: PlanRequest, max_len: int) -> str:
    """'--num-gpus N [--nodes M]': the fewest GPUs (doubling) that fit at this max_model_len, or ''."""
    from meshserve.planner.plan import make_plan

    per_node = r.gpu.gpus_per_node
    n = r.num_gpus * 2
    while n <= per_node * MAX_NODES:
        nodes = max(r.nodes, math.ceil(n / per_node))
        if n % nodes == 0:
            result = make_plan(dataclasses.replace(r, num_gpus=n, nodes=nodes), hint=False)
            if result.best is not None:
                flags = f"--num-gpus {n}" + (f" --nodes {nodes}" if nodes > 1 else "")
                return f"{flags} fits max_model_len {max_len:,} ({result.best.layout.label})"
        n *= 2
    return ""


def smaller_dtype_hint(r: PlanRequest, max_len: int) -> str:
    """'--dtype D --num-gpus N ...': the widest weight dtype narrower than the plan's that fits on the fewest GPUs
    (up to MAX_NODES nodes), or ''."""
    from meshserve.planner.memory import WEIGHT_DTYPE_BYTES
    from meshserve.planner.plan import make_plan  # (plan imports this module)

    current = WEIGHT_DTYPE_BYTES[r.weight_dtype or r.model.checkpoint_dtype]
    for dtype in sorted((d for d, b in WEIGHT_DTYPE_BYTES.items() if b < current and d != "int8"),
                        key=lambda d: -WEIGHT_DTYPE_BYTES[d]):
        quantized = dataclasses.replace(r, weight_dtype=dtype)
        if make_plan(quantized, hint=False).best is not None:
            return f"--dtype {dtype} fits on these {r.num_gpus} GPUs"
        more = more_gpus_hint(quantized, max_len)
        if more:
            return f"--dtype {dtype} {more}"
    return ""


def no_fit_hint(r: PlanRequest, max_len: int, too_big: list[MemoryBreakdown]) -> str:
    """What would fit, in one line: a shorter max_model_len, more GPUs, or both; failing those a narrower weight
    dtype; failing that, a line saying so (it printed no hint at all: the user learnt nothing to do)."""
    found = "; or ".join(h for h in (shorter_len_hint(r, max_len, too_big), more_gpus_hint(r, max_len)) if h)
    if found or not too_big:  # nothing too big: a layout rule, not memory, refused (the no-fit line says which)
        return found
    dtype = smaller_dtype_hint(r, max_len)
    if dtype:
        return dtype
    from meshserve.planner.memory import weight_bytes

    most = int(r.gpu.gpus_per_node * MAX_NODES)
    floor = weight_bytes(r.model, "int4") / most / 1e9  # a lower bound: int4, spread evenly, nothing else
    usable = r.gpu.memory_bytes * r.gpu_memory_utilization / 1e9
    return (f"nothing fits on up to {most:,} {r.gpu.name} GPUs ({MAX_NODES} nodes) at any --max-model-len or "
            f"--dtype (int4 weights spread evenly over {most:,}: {floor:,.1f} GB per GPU, {usable:,.1f} GB usable): "
            f"plan a GPU with more memory (--gpu, --list-gpus) or a smaller model")
