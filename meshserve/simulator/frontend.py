"""The API process in front of each replica: one CPU queue that every request and every streamed token crosses.

`meshserve serve` runs HTTP, validation, tokenization, admission and one SSE event per token in one Python
process (one GIL) beside the engine core. Modelled as a single first-come-first-served server: a request's
intake (parse, tokenize, admit or answer 429, set up its stream) costs per_request_s of its time and hands the
request to the core when done; the tokens of an engine step cost per_token_s each and reach the client when
done. Below saturation this adds about one intake to TTFT; past it, the backlog grows without bound: requests
reach the core late (their time-to-first-token target already spent, which the core's admission cannot see: it
counts from the handler's start) and tokens reach the client late and in bursts. That is the collapse measured
at W3 QPS 96 with targets on one H200 (BENCHMARKS.md, issue 18: the GPU only 56-61% busy).

Calibration (FRONTEND_H200, since 2026-12-02): the API processes' CPU measured under load (the eighteenth
session, Qwen3-0.6B W3 with 4 API processes at QPS 256-512 on one H200; validation_frontend.py): an admitted
request with its 128 streamed tokens costs 11.9 ms of its process, a refusal 1.0 ms (+- 0.9: weakly
determined). Every W3 request streams the same 128 tokens, so the run cannot split a request's intake from its
tokens; the intake is pinned to 4.9 ms by the light-load TTFT p50 (the fifteenth session's QPS 64: the intake
whose simulated TTFT equals the measured less the client's connect time), leaving 56 us per token (the stream's
set-up and close ride on its tokens). FRONTEND_BEFORE_GATE is the server before the gate and lean streaming
(before 1aa067c / b73b0d1), fitted to its one saturated point: at W3 QPS 96 with targets its API process
streamed 3,203 tok/s: (1 - 3,203 x 50 us) / 96 = 8.7 ms per request (a 429 counted as a full request), 50 us
per token = ~9 us of output processing measured (`meshserve bench channel`) + ~40 us estimated for the SSE
event.
Between jobs the queue drains at one second of work per second (the Lindley recursion); jobs must come in time
order (the replica delivers a decode run's steps lazily, in order, see replica.py).

The gate (`meshserve serve` with a TTFT target, since 1aa067c; serve/frontend_load.py): each API process tracks
the worst input delay (arrival to handler) and event-loop lag of the last second, the server's own WindowMax on
simulated time; in this queue both are the wait of a job that joins it (what a request waits before its
handler, what a token waits after its step). A request whose process's delays plus the core's predicted queue
wait break the target (under the admission margin) gets its 429 from the middleware before its body is parsed:
per_refusal_s of the process's time, not a whole intake. Without the gate every 429 cost a full intake and one
API process collapsed at W3 QPS 96; with it the server measured 52 req/s of goodput at QPS 128 on one process
(2026-11-30, PLANNER.md).

As the server learns them: a job's wait enters the signals when the job starts (the timer fires late, the
handler runs late), not when it joins, so requests arriving during a stall (frontend_stalls.py: a full
garbage collection with the loop stopped, as servers before 054ccb3 had) pass the gate on what was known
before it, as the server's step trace shows; the server's ARRIVAL stamp, where a request's TTFT clock starts
for its admission, is when the process gets to it (reached). And as lean streaming (b73b0d1, in every build
with the gate) writes them: a step's tokens that reach a process before its previous step's event is written
ride that event, costing the output processing alone (FOLDED_TOKEN_S), so a process behind after a stall catches
up; the client sees them as one chunk (no inter-token gap).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from meshserve.serve.frontend_load import WindowMax
from meshserve.simulator.frontend_stalls import FrontEndStalls, StallStream

# serve/frontend_load.FrontendLoad's window: the delays a request is judged by are the worst of the last second
GATE_WINDOW_S = 1.0


@dataclass(frozen=True)
class FrontEndCosts:
    """CPU seconds of the API process per request (intake, or a 429 after it), per streamed token, and per
    request refused at the gate (the middleware's 429 before parsing; 0: the same as per_request_s)."""

    per_request_s: float
    per_token_s: float
    per_refusal_s: float = 0.0

    @property
    def refusal_s(self) -> float:
        return self.per_refusal_s if self.per_refusal_s > 0 else self.per_request_s

    @property
    def enabled(self) -> bool:
        return self.per_request_s > 0 or self.per_token_s > 0


# validation_frontend.py's refit, rounded: python -m meshserve.simulator.validation_frontend
FRONTEND_H200 = FrontEndCosts(per_request_s=4.9e-3, per_token_s=56e-6, per_refusal_s=1.0e-3)
# the server before the gate (1aa067c) and lean streaming (b73b0d1): the runs of those builds replay with it
FRONTEND_BEFORE_GATE = FrontEndCosts(per_request_s=8.7e-3, per_token_s=50e-6, per_refusal_s=1.0e-3)
FRONTEND_OFF = FrontEndCosts(0.0, 0.0)
# a token that folds into its stream's event still waiting to be written (lean streaming, b73b0d1: a lagging
# caller's outputs go out as one event) costs the output processing alone, measured ~9 us per token (`meshserve
# bench channel`), not another SSE event
FOLDED_TOKEN_S = 9e-6


class FrontEnd:
    """A replica's API processes (`meshserve serve --api-server-count N`, 1 by default), each a queue:
    intake(t) and deliver(t, n) return when a job that arrives at t is done. With N processes a request's
    intake goes to the least backlogged one (a busy process is slow to accept) and a step's tokens split
    evenly over the N (their requests are spread over them); the client sees the step when the last share is
    delivered."""

    def __init__(self, costs: FrontEndCosts, processes: int = 1, gate: bool = False,
                 stalls: FrontEndStalls | None = None, seed: int = 0, replica: int = 0, fold: bool = False):
        if processes < 1:
            raise ValueError("an API server count is >= 1")
        self.costs = costs
        self.processes = processes
        self.t = 0.0  # process 0: when its last job arrived
        self.backlog_s = 0.0  # process 0: work queued at self.t, that job's included
        self._others = [[0.0, 0.0] for _ in range(processes - 1)]  # processes 1..N-1: [t, backlog]
        self._next = 0  # which process a step's odd tokens go to first (round robin)
        self.busy_s = 0.0  # work done in all
        # the gate's signals per process (the server's WindowMax on simulated time): input delay, loop lag;
        # tracked only with the gate on (the replica asks for it with a TTFT target)
        self.gate = gate
        # each process's clock as its signals are read (observations arrive in time order per process, not across)
        self._clock_s = [0.0] * processes
        self.input_delay = [WindowMax(GATE_WINDOW_S, self._clock(i)) for i in range(processes)]
        self.loop_lag = [WindowMax(GATE_WINDOW_S, self._clock(i)) for i in range(processes)]
        self.num_gate_refusals = 0
        # per process, observations made when the job starts, t + wait (the timer fires, the handler runs):
        # (time, wait, request?), a heap read up to the gate's time (delay_s)
        self._pending: list[list[tuple[float, float, bool]]] = [[] for _ in range(processes)]
        # each process's stalls (frontend_stalls.py): none without a table
        self._stalls = ([StallStream(stalls, seed, replica, i) for i in range(processes)]
                        if stalls is not None and stalls.enabled else None)
        self.stalled_s = 0.0  # stall time in all (not in busy_s)
        self.num_stalls = 0
        # lean streaming: a step's tokens that reach a process before its previous step's event is written go out
        # with that event (when each process's last token event is written)
        self.fold = fold
        self._token_done = [0.0] * processes

    def _clock(self, i: int):
        return lambda: self._clock_s[i]

    def _observe(self, i: int, t: float, wait_s: float, request: bool) -> None:
        """A job joins process i at t after wait_s of work ahead: a timer set now fires that late, and a request
        reaches its handler that late; the server records either then, at t + wait_s, not before."""
        if self.gate:
            heapq.heappush(self._pending[i], (t + wait_s, wait_s, request))

    def choose(self, t: float) -> int:
        """The process that takes a request arriving at t: the least backlogged (a busy one is slow to accept)."""
        if self.processes == 1:
            return 0
        return min(range(self.processes), key=lambda j: self._backlog_at(j, t))

    def reached(self, i: int, t: float) -> float:
        """When process i gets to a request arriving at t (the work ahead of it, a stall's included, done): the
        server's first ASGI call, where it stamps the request's arrival."""
        return t + self._backlog_at(i, t)

    def delay_s(self, i: int, t: float) -> tuple[float, float]:
        """Process i's (input delay, loop lag) as its gate reads them at t: the worst of the last second."""
        pending, clock = self._pending[i], self._clock_s
        while pending and pending[0][0] <= t:
            when, wait_s, request = heapq.heappop(pending)
            clock[i] = max(clock[i], when)
            self.loop_lag[i].add(wait_s)
            if request:
                self.input_delay[i].add(wait_s)
        clock[i] = max(clock[i], t)
        return self.input_delay[i].value(), self.loop_lag[i].value()

    def refuse(self, t: float, i: int) -> float:
        """Process i answers a request arriving at t with the gate's 429: when the client gets it."""
        self.num_gate_refusals += 1
        self._observe(i, t, self._backlog_at(i, t), request=False)
        return self._submit_to(i, t, self.costs.refusal_s)

    def submit(self, t: float, work_s: float) -> float:
        """A job for process 0."""
        last = self.t
        assert t >= last, "front-end jobs must arrive in time order"
        backlog = self.backlog_s - (t - last)
        if backlog < 0.0:  # noqa: PLR1730 - max() is a slow call in CPython 3.11
            backlog = 0.0
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

    def intake(self, t: float, i: int | None = None) -> float:
        """A request arrives at t (at process i, default the one choose(t) gives): when the core gets it (or the
        client its 429, when the core refuses it)."""
        if i is None:
            i = self.choose(t)
        self._observe(i, t, self._backlog_at(i, t), request=True)
        done = self._submit_to(i, t, self.costs.per_request_s)
        stall = self._stalls[i].after_intake() if self._stalls is not None else 0.0
        if stall:  # a collection in its handler: the request and everything behind it wait
            done = self._submit_to(i, t, stall)
            self.busy_s -= stall
            self.stalled_s += stall
            self.num_stalls += 1
            self._observe(i, done - stall, stall, request=False)  # the timer that fires late by it
        return done

    def _tokens(self, i: int, t: float, n: int) -> float:
        """n tokens of a step reach process i at t: when their event is written (an earlier one's, when they
        fold)."""
        self._observe(i, t, self._backlog_at(i, t), request=False)
        if self.fold and self._token_done[i] > t:
            self._submit_to(i, t, n * min(self.costs.per_token_s, FOLDED_TOKEN_S))
            return self._token_done[i]
        done = self._token_done[i] = self._submit_to(i, t, n * self.costs.per_token_s)
        return done

    def deliver(self, t: float, num_tokens: int) -> float:
        """A step's num_tokens tokens leave the core at t: when the client sees them."""
        if self.processes == 1:
            return self._tokens(0, t, num_tokens)
        share, odd = divmod(num_tokens, self.processes)
        done = t
        for k in range(self.processes):
            i = (self._next + k) % self.processes
            n = share + (k < odd)
            if n:
                done = max(done, self._tokens(i, t, n))
        self._next = (self._next + odd) % self.processes
        return done

    def deliver_counts(self, t: float, counts: list[int]) -> list[float]:
        """A step's tokens leave the core at t, counts[i] of them for streams of process i: when each process's
        clients see theirs (t for a process with none)."""
        return [self._tokens(i, t, n) if n else t for i, n in enumerate(counts)]

    def deliver_all(self, times: list[float], num_tokens: int) -> list[float]:
        """deliver(t, num_tokens) for each t of times (in order): the same floats, in one loop for one process."""
        if self.processes > 1 or self.fold:
            return [self.deliver(t, num_tokens) for t in times]
        work = num_tokens * self.costs.per_token_s
        last, backlog, out = self.t, self.backlog_s, []
        pending = self._pending[0] if self.gate else None
        for t in times:
            assert t >= last, "front-end jobs must arrive in time order"
            backlog = max(backlog - (t - last), 0.0)
            if pending is not None:
                heapq.heappush(pending, (t + backlog, backlog, False))
            backlog += work
            last = t
            out.append(t + backlog)
            self.busy_s += work
        self.t, self.backlog_s = last, backlog
        return out
