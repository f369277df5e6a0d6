"""Arrival traces: when each request arrives and how long its prompt and output are.

A trace is a list of SimRequest sorted by arrival. Prompts are described by lengths, not token ids; requests
that share a prefix name a prefix group, and the replica builds token ids from it (prefix_tokens), so the
prefix cache and prefix-affine routing see the sharing without the trace holding millions of ids.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from meshserve.errors import InvalidArgumentError

# W3 (../shared/DESIGN.md): 512-token prompts, 128 output tokens.
W3_INPUT_LEN = 512
W3_OUTPUT_LEN = 128


@dataclass(frozen=True)
class SimRequest:
    """One request of a trace. prefix_group: requests of one group share their first prefix_len tokens."""

    arrival_s: float
    prompt_len: int
    output_len: int
    prefix_group: int | None = None
    prefix_len: int = 0


def poisson_trace(qps: float, duration_s: float, seed: int, input_len: int = W3_INPUT_LEN,
                  output_len: int = W3_OUTPUT_LEN) -> list[SimRequest]:
    """Poisson arrivals at qps for duration_s seconds, every request of the given lengths (W3's by default)."""
    if qps <= 0 or duration_s <= 0:
        raise InvalidArgumentError("qps and duration must be > 0", param="qps")
    rng = random.Random(seed)
    out, t = [], rng.expovariate(qps)
    while t < duration_s:
        out.append(SimRequest(t, input_len, output_len))
        t += rng.expovariate(qps)
    return out


def bursty_trace(qps: float, duration_s: float, seed: int, burst_factor: float = 4.0, period_s: float = 30.0,
                 duty: float = 0.2, input_len: int = W3_INPUT_LEN, output_len: int = W3_OUTPUT_LEN,
                 ) -> list[SimRequest]:
    """On/off Poisson: for `duty` of every period the rate is burst_factor times the rest's, the mean staying
    qps (an inhomogeneous Poisson process drawn by thinning)."""
    if not 0 < duty < 1 or burst_factor < 1:
        raise InvalidArgumentError("bursty: need 0 < duty < 1 and burst_factor >= 1", param="burst_factor")
    low = qps / (duty * burst_factor + (1 - duty))
    high = low * burst_factor
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(high)
        if t >= duration_s:
            return out
        rate = high if (t % period_s) < duty * period_s else low
        if rng.random() * high < rate:
            out.append(SimRequest(t, input_len, output_len))


def shared_prefix_trace(base: list[SimRequest], num_groups: int, prefix_len: int, seed: int) -> list[SimRequest]:
    """The same arrivals, each request's prompt starting with one of num_groups shared prefixes (a system
    prompt per tenant, say): prefix caching and prefix-affine routing then matter."""
    rng = random.Random(seed)
    return [SimRequest(r.arrival_s, max(r.prompt_len, prefix_len + 1), r.output_len, rng.randrange(num_groups),
                       prefix_len) for r in base]


def w3_trace(qps: float, num_prompts: int | None = None) -> list[SimRequest]:
    """W3's arrivals exactly as `meshserve bench serve` draws them (seed 1000 + QPS, prompts then gaps)."""
    from meshserve.bench.serve_bench import w3_requests

    reqs = w3_requests(qps, num_prompts, W3_INPUT_LEN, W3_OUTPUT_LEN, seed=int(1000 + qps))
    return [SimRequest(r.send_at, len(r.prompt), r.max_tokens) for r in reqs]


def file_trace(path: str | Path) -> list[SimRequest]:
    """A JSON-lines file, one request a line: {"arrival_s" (or "timestamp"), "prompt_len" (or "prompt_tokens"),
    "output_len" (or "output_tokens"), optional "prefix_group", "prefix_len"}; timestamps are shifted to
    start at 0."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"trace file not found: {p}", param="trace")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            rows.append(SimRequest(float(d.get("arrival_s", d.get("timestamp"))),
                                   int(d.get("prompt_len", d.get("prompt_tokens"))),
                                   int(d.get("output_len", d.get("output_tokens"))),
                                   d.get("prefix_group"), int(d.get("prefix_len", 0))))
        except (ValueError, TypeError) as e:
            raise InvalidArgumentError(f"{p}:{n}: not a trace row ({e})", param="trace") from e
    if not rows:
        raise InvalidArgumentError(f"{p}: no requests", param="trace")
    rows.sort(key=lambda r: r.arrival_s)
    t0 = rows[0].arrival_s
    return [SimRequest(r.arrival_s - t0, r.prompt_len, r.output_len, r.prefix_group, r.prefix_len) for r in rows]


def prompt_token_ids(index: int, req: SimRequest, vocab: int = 32000) -> list[int]:
    """Token ids for request `index`: its group's shared prefix, then ids of its own, which begin with the
    index written in base `vocab`, so two requests never share a block by accident."""
    own_len = req.prompt_len - (req.prefix_len if req.prefix_group is not None else 0)
    own = [index % vocab, (index // vocab) % vocab, (index // vocab // vocab) % vocab]
    own = (own + list(range(1, own_len)))[:own_len]
    if req.prefix_group is None:
        return own
    base = (req.prefix_group * 40503 + 7) % vocab
    return [(base + 3 * j) % vocab for j in range(req.prefix_len)] + own


def mean_rate(trace: list[SimRequest]) -> float:
    """Requests per second over the trace's span."""
    if len(trace) < 2:
        return 0.0
    return (len(trace) - 1) / max(trace[-1].arrival_s - trace[0].arrival_s, math.ulp(1.0))
