"""What a simulated run measured: per-request latencies, inter-token gaps, goodput, GPU-hours and cost.

Definitions follow `meshserve bench serve` (meshserve/bench/serve_bench.py), so a simulated point reads like
a measured one: TTFT from arrival to the first token; TPOT = (e2e - TTFT) / (output tokens - 1); goodput =
requests meeting both SLOs per second of the whole run (first arrival at 0 to the last completion); a request
refused (429: queue full, predicted TTFT past target, shed late) counts as failed.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import numpy as np

from meshserve.planner.hardware import GpuSpec

# Inter-token gaps are binned (0.1 ms wide, up to 60 s) rather than kept: an hour at 1,000 req/s is 460 M gaps.
ITL_BIN_S = 1e-4
_ITL_BINS = 600_000


@dataclass
class RunRecorder:
    """Filled by the replicas as tokens come out; summarize() turns it into the report."""

    # per finished request: the arrival (the trace's own float) and the token counts (mostly small cached ints)
    # in lists, the new floats in arrays (a list would keep each one alive); an array's append parses its
    # argument, several times a list's
    arrival_s: list[float] = field(default_factory=list)
    ttft_s: array = field(default_factory=lambda: array("d"))
    e2e_s: array = field(default_factory=lambda: array("d"))
    output_tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    num_rejected: int = 0  # 429 at the door: queue full or predicted TTFT past its target
    num_shed: int = 0  # dropped from the queue once too late for the TTFT target
    num_preemptions: int = 0
    # seconds from a request's sending to its 429 at the door (the gate's, or the core's after the intake)
    reject_latency_s: array = field(default_factory=lambda: array("d"))
    itl_counts: np.ndarray = field(default_factory=lambda: np.zeros(_ITL_BINS, dtype=np.int64))
    _itl_pending: dict[int, int] = field(default_factory=dict)  # bin -> gaps, not yet in itl_counts
    # gaps not yet binned: single (gap, count) and linear runs (first gap, slope, steps, count); the counts in
    # lists (an array's append parses its argument, several times a list's: the ints are mostly the small
    # cached ones, read back at little cost), the new floats in arrays (a list would keep each one alive).
    # The fast model's DecodeSegment.deliver appends to them itself (a call per gap was a large share of its
    # cost): add_itl_count's, add_itl_linear's
    gap_s: array = field(default_factory=lambda: array("d"))
    gap_counts: list[int] = field(default_factory=list)
    run_s: array = field(default_factory=lambda: array("d"))
    run_slope_s: array = field(default_factory=lambda: array("d"))
    run_steps: list[int] = field(default_factory=list)
    run_n: list[int] = field(default_factory=list)
    last_completion_s: float = 0.0

    def add_itl(self, gap_s: float) -> None:
        b = int(gap_s / ITL_BIN_S)
        self._itl_pending[b] = self._itl_pending.get(b, 0) + 1

    def add_itl_count(self, gap_s: float, count: int) -> None:
        """count gaps of gap_s (every sequence of one step). Kept raw and binned in bulk (flush_itl)."""
        self.gap_s.append(gap_s)
        self.gap_counts.append(count)

    def add_itl_count_many(self, gaps_s: list[float], count: int) -> None:
        """count gaps of each of gaps_s (every sequence of a step, for each step), kept raw as add_itl_count's."""
        self.gap_s.extend(gaps_s)
        self.gap_counts.extend([count] * len(gaps_s))

    def add_itl_linear(self, first_s: float, slope_s: float, steps: int, count: int) -> None:
        """count gaps of each of first_s + slope_s * i, i = 0..steps-1 (a decode segment's step durations,
        fast_replica.py; slope_s >= 0: a gap grows by microseconds a step). Kept raw and binned in bulk."""
        self.run_s.append(first_s)
        self.run_slope_s.append(slope_s)
        self.run_steps.append(steps)
        self.run_n.append(count)

    def add_itl_counts(self, gaps_s: list[float], count: int) -> None:
        """count gaps of each of gaps_s (every sequence of a decode step, for each step)."""
        pending = self._itl_pending
        for gap in gaps_s:
            b = int(gap / ITL_BIN_S)
            pending[b] = pending.get(b, 0) + count

    def flush_itl(self) -> None:
        """Bin the gaps kept raw (the same bins as int(gap / ITL_BIN_S) one by one)."""
        if self.gap_s:
            bins = (np.frombuffer(self.gap_s, dtype=float) / ITL_BIN_S).astype(np.int64)
            self._add_bins(bins, np.fromiter(self.gap_counts, dtype=np.int64, count=len(self.gap_counts)))
            self.gap_s, self.gap_counts = array("d"), []  # (numpy's views keep the old ones)
        if self.run_s:
            first, slope = np.frombuffer(self.run_s, dtype=float), np.frombuffer(self.run_slope_s, dtype=float)
            steps = np.fromiter(self.run_steps, dtype=np.int64, count=len(self.run_steps))
            count = np.fromiter(self.run_n, dtype=np.int64, count=len(self.run_n))
            b0 = (first / ITL_BIN_S).astype(np.int64)
            b1 = ((first + slope * (steps - 1)) / ITL_BIN_S).astype(np.int64)
            one = b0 == b1  # gaps grow with the step: a run that starts and ends in one bin stays in it
            self._add_bins(b0[one], steps[one] * count[one])
            if not one.all():  # the others step by step: gap first + slope * i of step i, as one by one
                first, slope, steps, count = first[~one], slope[~one], steps[~one], count[~one]
                run = np.repeat(np.arange(steps.size), steps)  # each step's run
                i = np.arange(run.size) - np.repeat(np.cumsum(steps) - steps, steps)
                self._add_bins(((first[run] + slope[run] * i) / ITL_BIN_S).astype(np.int64), count[run])
            self.run_s, self.run_slope_s, self.run_steps, self.run_n = array("d"), array("d"), [], []

    def _add_bins(self, bins: np.ndarray, counts: np.ndarray) -> None:
        if bins.size:  # bincount over the bins' own range (np.add.at is ~10x slower per gap)
            bins = np.minimum(bins, _ITL_BINS - 1)
            lo = int(bins.min())
            summed = np.bincount(bins - lo, weights=counts)
            self.itl_counts[lo:lo + summed.size] += np.rint(summed).astype(np.int64)

    def _flush_itl(self) -> None:
        self.flush_itl()
        if self._itl_pending:
            bins = np.minimum(np.fromiter(self._itl_pending.keys(), dtype=np.int64), _ITL_BINS - 1)
            np.add.at(self.itl_counts, bins, np.fromiter(self._itl_pending.values(), dtype=np.int64))
            self._itl_pending.clear()

    def finish(self, arrival: float, first_token: float, now: float, num_output: int, num_prompt: int) -> None:
        self.arrival_s.append(arrival)
        self.ttft_s.append(first_token - arrival)
        self.e2e_s.append(now - arrival)
        self.output_tokens.append(num_output)
        self.prompt_tokens.append(num_prompt)
        if now > self.last_completion_s:  # noqa: PLR1730 - max() is a slow call in CPython 3.11
            self.last_completion_s = now

    # -- the report ------------------------------------------------------------------------------
    def itl_percentile(self, q: float) -> float:
        return self.itl_percentiles([q])[0]

    def itl_percentiles(self, qs: list[float]) -> list[float]:
        self._flush_itl()
        cumulative = np.cumsum(self.itl_counts)
        total = int(cumulative[-1])
        if total == 0:
            return [float("nan")] * len(qs)
        return [(int(np.searchsorted(cumulative, q / 100 * total, side="left")) + 0.5) * ITL_BIN_S for q in qs]

    def summarize(self, num_requests: int, duration_s: float, gpu: GpuSpec, num_gpus: int,
                  ttft_slo_s: float = 1.0, tpot_slo_s: float = 0.05, gpu_hours: float | None = None) -> dict:
        """The report; gpu_hours defaults to num_gpus for the whole run (an autoscaled fleet passes its own)."""
        # in arrival order, whatever order requests finished in (decode runs record theirs at the run's end):
        # sums and means then do not depend on it
        arrival = np.array(self.arrival_s, dtype=float)
        order = np.argsort(arrival, kind="stable")
        if np.any(arrival[order[1:]] == arrival[order[:-1]]):  # equal arrivals: the other fields order them
            order = np.lexsort((np.asarray(self.output_tokens, dtype=np.int64), np.frombuffer(self.ttft_s, dtype=float),
                                np.frombuffer(self.e2e_s, dtype=float), arrival))
        ttft = np.frombuffer(self.ttft_s, dtype=float)[order]
        e2e = np.frombuffer(self.e2e_s, dtype=float)[order]
        out = np.asarray(self.output_tokens, dtype=np.int64)[order].astype(float)
        prompt = int(np.asarray(self.prompt_tokens, dtype=np.int64).sum())
        multi = out > 1
        tpot = np.where(multi, (e2e - ttft) / np.maximum(out - 1, 1), 0.0)
        good = int(np.count_nonzero((ttft <= ttft_slo_s) & (tpot <= tpot_slo_s)))
        out_tokens = int(out.sum())
        gpu_hours = num_gpus * duration_s / 3600 if gpu_hours is None else gpu_hours
        usd = gpu_hours * gpu.price_per_hour_usd

        def pct(a: np.ndarray, prefix: str) -> dict[str, float]:
            if a.size == 0:
                return {f"{prefix}_{k}": float("nan") for k in ("mean", "p50", "p90", "p99")}
            p50, p90, p99 = np.percentile(a, [50, 90, 99])
            return {f"{prefix}_mean": float(a.mean()), f"{prefix}_p50": float(p50), f"{prefix}_p90": float(p90),
                    f"{prefix}_p99": float(p99)}

        rate = (lambda n: n / duration_s if duration_s > 0 else 0.0)
        s = {"num_requests": num_requests, "completed": len(ttft), "failed": num_requests - len(ttft),
             "rejected": self.num_rejected, "shed": self.num_shed, "preemptions": self.num_preemptions,
             "duration_s": duration_s, "request_throughput": rate(len(ttft)), "output_tok_s": rate(out_tokens),
             "output_tokens": out_tokens, "prompt_tokens": prompt, "goodput": rate(good),
             "ttft_slo_s": ttft_slo_s, "tpot_slo_s": tpot_slo_s}
        s.update(pct(ttft, "ttft"))
        s.update(zip(("itl_p50", "itl_p90", "itl_p99"), self.itl_percentiles([50, 90, 99])))
        s["itl_gaps"] = int(self.itl_counts.sum())  # itl_percentiles flushed the pending ones
        s.update(pct(tpot[multi], "tpot"))
        s.update(pct(e2e, "e2e"))
        # Little's law over the run: the mean number of requests in flight (arrival to last token), the figure an
        # in-flight autoscaling threshold compares with (deploy/k8s/autoscaling-keda.yaml)
        s["in_flight_mean"] = float(e2e.sum()) / duration_s if duration_s > 0 else 0.0
        if self.reject_latency_s:  # as `bench serve`'s "refused in": only when something was refused
            s.update(pct(np.frombuffer(self.reject_latency_s, dtype=float), "reject_latency"))
        s["gpu_hours"] = gpu_hours
        s["cost"] = {"usd": usd, "usd_per_gpu_hour": gpu.price_per_hour_usd,
                     "usd_per_million_output_tokens": usd / out_tokens * 1e6 if out_tokens else float("inf"),
                     "price_is_assumption": gpu.price_is_assumption}
        return s
