"""The API process in front of each replica: one CPU queue that every request and every streamed token crosses.

`meshserve serve` runs HTTP, validation, tokenization, admission and one SSE event per token in one Python
process (one GIL) beside the engine core. Modelled as a single first-come-first-served server: a request's
intake (parse, tokenize, admit or answer 429, set up its stream) costs per_request_s of its time and hands the
request to the core when done; the tokens of an engine step cost per_token_s each and reach the client when
done. Below saturation this adds about one intake to TTFT; past it, the backlog grows without bound: requests
reach the core late (their time-to-first-token target already spent, which the core's admission cannot see: it
counts from the handler's start) and tokens reach the client late and in bursts. That is the collapse measured
at W3 QPS 96 with targets on one H200 (BENCHMARKS.md, issue 18: the GPU only 56-61% busy).

Calibration (FRONTEND_H200, assumptions): per_token_s = 50 us: the front end's output processing measured
~9 us per token (`meshserve bench channel`, batch 256) plus an SSE event's JSON and write, estimated at ~40 us
(not measured alone). per_request_s from the one saturated point measured: at QPS 96 with targets the API
process was saturated while it streamed 3,203 tok/s: (1 - 3,203 x 50 us) / 96 = 8.7 ms per request (a 429
counted as a full request). Only that sum is measured: a heavier token and lighter request split fits it too.
Between jobs the queue drains at one second of work per second (the Lindley recursion); jobs must come in time
order (the replica delivers a decode run's steps lazily, in order, see replica.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FrontEndCosts:
    """CPU seconds of the API process per request (intake, or a 429) and per streamed token."""

    per_request_s: float
    per_token_s: float

    @property
    def enabled(self) -> bool:
        return self.per_request_s > 0 or self.per_token_s > 0


FRONTEND_H200 = FrontEndCosts(per_request_s=8.7e-3, per_token_s=50e-6)
FRONTEND_OFF = FrontEndCosts(0.0, 0.0)


class FrontEnd:
    """A replica's API processes (`meshserve serve --api-server-count N`, 1 by default), each a queue:
    intake(t) and deliver(t, n) return when a job that arrives at t is done. With N processes a request's
    intake goes to the least backlogged one (a busy process is slow to accept) and a step's tokens split
    evenly over the N (their requests are spread over them); the client sees the step when the last share is
    delivered."""

    def __init__(self, costs: FrontEndCosts, processes: int = 1):
        if processes < 1:
            raise ValueError("an API server count is >= 1")
        self.costs = costs
        self.processes = processes
        self.t = 0.0  # process 0: when its last job arrived
        self.backlog_s = 0.0  # process 0: work queued at self.t, that job's included
        self._others = [[0.0, 0.0] for _ in range(processes - 1)]  # processes 1..N-1: [t, backlog]
        self._next = 0  # which process a step's odd tokens go to first (round robin)
        self.busy_s = 0.0  # work done in all

    def submit(self, t: float, work_s: float) -> float:
        """A job for process 0."""
        assert t >= self.t, "front-end jobs must arrive in time order"
        backlog = self.backlog_s - (t - self.t)
        backlog = max(backlog, 0.0)
        backlog += work_s
        self.t, self.backlog_s = t, backlog
        self.busy_s += work_s
        return t + backlog

    def _submit_to(self, i: int, t: float, work_s: float) -> float:
        if i == 0:
            return self.submit(t, work_s)
        q = self._others[i - 1]
        assert t >= q[0], "front-end jobs must arrive in time order"
        q[1] = max(q[1] - (t - q[0]), 0.0) + work_s
        q[0] = t
        self.busy_s += work_s
        return t + q[1]

    def _backlog_at(self, i: int, t: float) -> float:
        last, backlog = (self.t, self.backlog_s) if i == 0 else self._others[i - 1]
        return max(backlog - (t - last), 0.0)

    def intake(self, t: float) -> float:
        """A request arrives at t: when the core gets it (or the client its 429)."""
        if self.processes == 1:
            return self.submit(t, self.costs.per_request_s)
        i = min(range(self.processes), key=lambda j: self._backlog_at(j, t))
        return self._submit_to(i, t, self.costs.per_request_s)

    def deliver(self, t: float, num_tokens: int) -> float:
        """A step's num_tokens tokens leave the core at t: when the client sees them."""
        if self.processes == 1:
            return self.submit(t, num_tokens * self.costs.per_token_s)
        share, odd = divmod(num_tokens, self.processes)
        done = t
        for k in range(self.processes):
            i = (self._next + k) % self.processes
            n = share + (k < odd)
            if n:
                done = max(done, self._submit_to(i, t, n * self.costs.per_token_s))
        self._next = (self._next + odd) % self.processes
        return done

    def deliver_all(self, times: list[float], num_tokens: int) -> list[float]:
        """deliver(t, num_tokens) for each t of times (in order): the same floats, in one loop for one process."""
        if self.processes > 1:
            return [self.deliver(t, num_tokens) for t in times]
        work = num_tokens * self.costs.per_token_s
        last, backlog, out = self.t, self.backlog_s, []
        for t in times:
            assert t >= last, "front-end jobs must arrive in time order"
            backlog = max(backlog - (t - last), 0.0) + work
            last = t
            out.append(t + backlog)
            self.busy_s += work
        self.t, self.backlog_s = last, backlog
        return out
