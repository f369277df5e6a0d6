"""One SchedulerStats for N data-parallel engine cores, as the front end (admission, /metrics) reads it.

- counts and cumulative counters (running, waiting, tokens, hits, bytes, seconds...) add up;
- per-step gauges of the device (step times, model error, pipeline bubble) are the mean over cores;
- KV cache usage is weighted by each core's blocks, the prefix cache hit rate is recomputed from the sums;
- the admission prediction (queue_wait_s, prefill_s_per_token) is the least loaded core's: a new request
  goes there, so the server refuses only when even that core would break the TTFT target.
A dead core's counters stay in the sums (a counter that went back would read as a reset), but it is never
the one the prediction comes from.
"""

from __future__ import annotations

from meshserve.engine.messages import SchedulerStats

_MEAN = frozenset({"pp_bubble", "step_time_predicted_s", "step_time_actual_s", "step_time_model_error"})
_FROM_TARGET = frozenset({"queue_wait_s", "prefill_s_per_token"})
_DERIVED = frozenset({"kv_cache_usage", "prefix_cache_hit_rate", "expert_load"})


def _add_lists(lists: list[list]) -> list:
    """Element-wise sum of (nested) lists of numbers; lists of different shapes keep the longest's tail."""
    out: list = []
    for lst in lists:
        for i, v in enumerate(lst):
            if i == len(out):
                out.append(v if not isinstance(v, list) else _add_lists([v]))
            elif isinstance(v, list):
                out[i] = _add_lists([out[i], v])
            else:
                out[i] += v
    return out


def merge_stats(
    per_core: list[SchedulerStats], target: int | None, expert_load: list[list[list[int]]] | None = None
) -> SchedulerStats:
    """The server's stats from each core's last ones; target: the core a new request would go to (None: none
    alive, predictions from all); expert_load: each core's last non-empty per-expert counts."""
    merged: dict = {}
    n = len(per_core)
    for name in SchedulerStats.__struct_fields__:
        if name in _DERIVED or name in _FROM_TARGET:
            continue
        values = [getattr(s, name) for s in per_core]
        if name in _MEAN:
            merged[name] = sum(values) / n
        elif isinstance(values[0], list):
            merged[name] = _add_lists(values)
        else:
            merged[name] = sum(values)
    src = [per_core[target]] if target is not None else per_core
    for name in _FROM_TARGET:
        merged[name] = min(getattr(s, name) for s in src)
    blocks = merged["num_blocks"]
    merged["kv_cache_usage"] = (
        sum(s.kv_cache_usage * s.num_blocks for s in per_core) / blocks
        if blocks
        else sum(s.kv_cache_usage for s in per_core) / n
    )
    queries = merged["prefix_cache_queries"]
    merged["prefix_cache_hit_rate"] = merged["prefix_cache_hits"] / queries if queries else 0.0
    merged["expert_load"] = _add_lists([e for e in expert_load or [] if e])
    return SchedulerStats(**merged)


def load_of(stats: SchedulerStats) -> int:
    """Sequences a core holds as of its last stats (running or waiting), from every front end."""
    return stats.num_running + stats.num_waiting
