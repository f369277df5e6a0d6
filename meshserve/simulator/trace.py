"""Arrival traces: when each request arrives and how long its prompt and output are.

A trace is a Trace (columns: an hour at 1,000 req/s is 3.6 M requests) that reads as a sequence of SimRequest
sorted by arrival; simulate() also takes a plain list of SimRequest. Prompts are described by lengths, not
token ids; requests that share a prefix name a prefix group, and the replica builds token ids from it
(prompt_token_ids), so the prefix cache and prefix-affine routing see the sharing without the trace holding
millions of ids. Random arrivals are drawn with numpy's generator, in one go: deterministic for a seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshserve.cli_paths import read_text_file
from meshserve.errors import InvalidArgumentError

# W3 (../shared/DESIGN.md): 512-token prompts, 128 output tokens.
W3_INPUT_LEN = 512
W3_OUTPUT_LEN = 128


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request of a trace. prefix_group: requests of one group share their first prefix_len tokens."""

    arrival_s: float
    prompt_len: int
    output_len: int
    prefix_group: int | None = None
    prefix_len: int = 0


class Trace(Sequence):
    """Requests as columns (arrival seconds, prompt and output lengths, prefix group (-1: none) and length),
    sorted by arrival; indexing gives SimRequest."""

    def __init__(self, arrival_s, prompt_len, output_len, prefix_group=None, prefix_len=None):
        self.arrival_s = np.asarray(arrival_s, dtype=np.float64)
        n = len(self.arrival_s)
        self.prompt_len = np.broadcast_to(np.asarray(prompt_len, dtype=np.int64), (n,))
        self.output_len = np.broadcast_to(np.asarray(output_len, dtype=np.int64), (n,))
        self.prefix_group = None if prefix_group is None else np.asarray(prefix_group, dtype=np.int64)
        self.prefix_len = None if prefix_len is None else np.broadcast_to(np.asarray(prefix_len, dtype=np.int64),
                                                                          (n,))

    @classmethod
    def of(cls, requests: Iterable[SimRequest]) -> Trace:
        """A Trace of SimRequests (a Trace is returned as it is)."""
        if isinstance(requests, Trace):
            return requests
        reqs = list(requests)
        grouped = any(r.prefix_group is not None for r in reqs)
        return cls([r.arrival_s for r in reqs], [r.prompt_len for r in reqs], [r.output_len for r in reqs],
                    [-1 if r.prefix_group is None else r.prefix_group for r in reqs] if grouped else None,
                    [r.prefix_len for r in reqs] if grouped else None)

    @property
    def has_prefixes(self) -> bool:
        return self.prefix_group is not None and bool((self.prefix_group >= 0).any())

    def __len__(self) -> int:
        return len(self.arrival_s)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Trace.of(self[j] for j in range(*i.indices(len(self))))
        group = -1 if self.prefix_group is None else int(self.prefix_group[i])
        return SimRequest(float(self.arrival_s[i]), int(self.prompt_len[i]), int(self.output_len[i]),
                          None if group < 0 else group, 0 if group < 0 else int(self.prefix_len[i]))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __add__(self, other: Iterable[SimRequest]) -> Trace:
        """Both traces' requests, sorted by arrival."""
        reqs = sorted([*self, *other], key=lambda r: r.arrival_s)
        return Trace.of(reqs)

    __hash__ = None


def poisson_arrivals(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process at `rate` over [0, duration_s): cumulated exponential gaps."""
    out, t0 = [], 0.0
    while True:
        n = int(rate * (duration_s - t0) * 1.05) + 64
        times = t0 + np.cumsum(rng.exponential(1.0 / rate, n))
        if times[-1] >= duration_s:
            out.append(times[times < duration_s])
            return np.concatenate(out)
        out.append(times)
        t0 = float(times[-1])


def poisson_trace(qps: float, duration_s: float, seed: int, input_len: int = W3_INPUT_LEN,
                  output_len: int = W3_OUTPUT_LEN) -> Trace:
    """Poisson arrivals at qps for duration_s seconds, every request of the given lengths (W3's by default)."""
    if qps <= 0 or duration_s <= 0:
        raise InvalidArgumentError("qps and duration must be > 0", param="qps")
    return Trace(poisson_arrivals(qps, duration_s, np.random.default_rng(seed)), input_len, output_len)


def bursty_trace(qps: float, duration_s: float, seed: int, burst_factor: float = 4.0, period_s: float = 30.0,
                 duty: float = 0.2, input_len: int = W3_INPUT_LEN, output_len: int = W3_OUTPUT_LEN) -> Trace:
    """On/off Poisson: for `duty` of every period the rate is burst_factor times the rest's, the mean staying
    qps (an inhomogeneous Poisson process drawn by thinning)."""
    if not 0 < duty < 1 or burst_factor < 1:
        raise InvalidArgumentError("bursty: need 0 < duty < 1 and burst_factor >= 1", param="burst_factor")
    if qps <= 0 or duration_s <= 0:
        raise InvalidArgumentError("qps and duration must be > 0", param="qps")
    low = qps / (duty * burst_factor + (1 - duty))
    high = low * burst_factor
    rng = np.random.default_rng(seed)
    t = poisson_arrivals(high, duration_s, rng)
    rate = np.where((t % period_s) < duty * period_s, high, low)
    return Trace(t[rng.random(len(t)) * high < rate], input_len, output_len)


def shared_prefix_trace(base: Sequence[SimRequest], num_groups: int, prefix_len: int, seed: int) -> Trace:
    """The same arrivals, each request's prompt starting with one of num_groups shared prefixes (a system
    prompt per tenant, say): prefix caching and prefix-affine routing then matter."""
    base = Trace.of(base)
    groups = np.random.default_rng(seed).integers(0, num_groups, len(base))
    return Trace(base.arrival_s, np.maximum(base.prompt_len, prefix_len + 1), base.output_len, groups, prefix_len)


def w3_trace(qps: float, num_prompts: int | None = None) -> Trace:
    """W3's arrivals exactly as `meshserve bench serve` draws them (seed 1000 + QPS, prompts then gaps)."""
    from meshserve.bench.serve_bench import w3_arrivals

    arrivals = w3_arrivals(qps, num_prompts, W3_INPUT_LEN, seed=int(1000 + qps))
    return Trace(arrivals, W3_INPUT_LEN, W3_OUTPUT_LEN)


def file_trace(path: str | Path) -> Trace:
    """A JSON-lines file, one request a line: {"arrival_s" (or "timestamp"), "prompt_len" (or "prompt_tokens"),
    "output_len" (or "output_tokens"), optional "prefix_group", "prefix_len"}; timestamps are shifted to
    start at 0."""
    p = Path(path)
    text = read_text_file(str(p), "--trace", "trace")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            # a row that is valid JSON but not an object (a list, a string, null) was an AttributeError
            # traceback; a prefix_group that is not a whole number one from numpy after the whole file
            if not isinstance(d, dict):
                raise TypeError(f"expected a JSON object, got {type(d).__name__}")
            missing = [k for k, alt in (("arrival_s", "timestamp"), ("prompt_len", "prompt_tokens"),
                                        ("output_len", "output_tokens")) if d.get(k, d.get(alt)) is None]
            if missing:  # was "int() argument must be ... not 'NoneType'", naming no field
                raise ValueError(f"missing {', '.join(missing)}")
            group = d.get("prefix_group")
            rows.append(SimRequest(float(d.get("arrival_s", d.get("timestamp"))),
                                   int(d.get("prompt_len", d.get("prompt_tokens"))),
                                   int(d.get("output_len", d.get("output_tokens"))),
                                   None if group is None else int(group), int(d.get("prefix_len", 0))))
        except (ValueError, TypeError) as e:
            raise InvalidArgumentError(f"{p}:{n}: not a trace row ({e})", param="trace") from e
        r = rows[-1]
        # output 0 stays: a served request's log row may hold it (simulator handles it); a prompt never does.
        # A prefix longer than its prompt gave token ids longer than prompt_len (prompt_token_ids), so the
        # replica ran a prompt the trace did not describe.
        if not (math.isfinite(r.arrival_s) and r.prompt_len >= 1 and r.output_len >= 0
                and 0 <= r.prefix_len <= r.prompt_len):
            raise InvalidArgumentError(f"{p}:{n}: a trace row needs a finite arrival time, a prompt length >= 1 "
                                       f"(and >= its prefix_len) and an output length >= 0, got {line.strip()}",
                                       param="trace")
    if not rows:
        raise InvalidArgumentError(f"{p}: no requests", param="trace")
    rows.sort(key=lambda r: r.arrival_s)
    t0 = rows[0].arrival_s
    return Trace.of(SimRequest(r.arrival_s - t0, r.prompt_len, r.output_len, r.prefix_group, r.prefix_len)
                    for r in rows)


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


def mean_rate(trace: Sequence[SimRequest]) -> float:
    """Requests per second over the trace's span."""
    if len(trace) < 2:
        return 0.0
    return (len(trace) - 1) / max(trace[-1].arrival_s - trace[0].arrival_s, math.ulp(1.0))
