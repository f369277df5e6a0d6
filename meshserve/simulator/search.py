"""Layout search: simulate the same traffic on every layout that fits, rank by goodput per dollar.

Candidates are the planner's layouts (meshserve/planner/layout.py) for each GPU count asked, restricted to what
the simulator models (tensor parallel inside a node, pipeline stages as the planner places them, times
data-parallel replicas; expert parallelism over one replica's TP ranks, as the engine's --enable-expert-parallel,
not across replicas), and kept when a replica holds the weights plus one max_model_len sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from meshserve.errors import InvalidArgumentError
from meshserve.planner.layout import enumerate_layouts
from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.trace import SimRequest


def candidate_configs(config: SimConfig, gpu_counts: list[int]) -> tuple[list[SimConfig], list[str]]:
    """One SimConfig per runnable TP x DP layout, and a line for each layout left out."""
    model, gpu = config.model_spec(), config.gpu_spec()
    out, skipped = [], []
    for n in gpu_counts:
        layouts, rejected = enumerate_layouts(model, n, gpu.gpus_per_node)
        skipped += [str(r) for r in rejected]
        for layout in layouts:
            if layout.ep > 1 and layout.ep != layout.tp:  # the planner's EP may span DP replicas too
                skipped.append(f"{layout.label}: experts over several replicas (DP attention) are not simulated: "
                               "the engine's expert parallelism spans one replica's TP ranks")
                continue
            if layout.pp > 1 and config.step_noise:
                skipped.append(f"{layout.label}: step noise is not modelled with pipeline stages")
                continue
            candidate = dataclasses.replace(config, num_gpus=n, tp=layout.tp, pp=layout.pp,
                                            enable_expert_parallel=layout.ep > 1)
            try:  # a layout the other flags cannot run (--disaggregation P:D over its replicas, ...) is left out
                candidate.validate()
                candidate.kv_blocks(model, gpu)
            except InvalidArgumentError as e:
                skipped.append(f"{layout.label}: {e}")
                continue
            out.append(candidate)
    return out, skipped


def search_layouts(config: SimConfig, trace: list[SimRequest], gpu_counts: list[int],
                   progress: Callable[[str], None] | None = None) -> dict:
    """Every candidate's key numbers, best first: goodput per fleet dollar-hour (the catalog's assumed price),
    then lower TTFT p50."""
    candidates, skipped = candidate_configs(config, gpu_counts)
    if not candidates:
        raise InvalidArgumentError("no layout fits: " + "; ".join(skipped), param="num_gpus")
    rows = []
    for c in candidates:
        label = (f"{c.num_gpus} GPUs, TP={c.tp}" + (f" x PP={c.pp}" if c.pp > 1 else "") + f" x DP={c.num_replicas}"
                 + (f", EP={c.layout.ep}" if c.layout.ep > 1 else ""))
        if progress is not None:
            progress(label)
        r = simulate(c, trace)
        usd_per_hour = r["cost"]["usd_per_gpu_hour"] * c.num_gpus
        rows.append({"layout": label, "num_gpus": c.num_gpus, "tp": c.tp, "pp": c.pp, "ep": c.layout.ep,
                     "replicas": c.num_replicas,
                     "goodput": r["goodput"], "goodput_per_usd_hour": r["goodput"] / usd_per_hour,
                     "usd_per_hour": usd_per_hour,
                     "usd_per_million_output_tokens": r["cost"]["usd_per_million_output_tokens"],
                     "ttft_p50": r["ttft_p50"], "ttft_p99": r["ttft_p99"], "tpot_p50": r["tpot_p50"],
                     "tpot_p99": r["tpot_p99"], "failed": r["failed"]})
    rows.sort(key=lambda row: (-row["goodput_per_usd_hour"], row["ttft_p50"]))
    return {"ranked": rows, "skipped": skipped, "price_is_assumption": True}
