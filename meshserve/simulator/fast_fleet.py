"""The event loop over fast replicas (fast_replica.py), and which configurations they cover.

The same events, in the same order, as fleet.py's loop over the reference replicas (arrivals first at equal
times; then by time, replica index, kind): a request reaching a replica's core through its API process, a
replica's step or decode segment ending, an idle replica waking (and the timeline's ticks). A replica pushes
the events its arrivals cause on the heap itself (FastReplica.arrive). The least-outstanding router chooses
through a bucketed index (least_outstanding.py: the scan's choices without the scan); round robin as the
router does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from heapq import heappop, heappush, heapreplace

from meshserve.simulator.config import SimConfig
from meshserve.simulator.fast_replica import ADMIT, STEP_END, WAKE, FastReplica
from meshserve.simulator.least_outstanding import LeastOutstandingIndex
from meshserve.simulator.metrics import RunRecorder
from meshserve.simulator.trace import Trace

TICK = 2  # the timeline's ticks (fast_replica.py has the replicas' kinds)

# What the fast replica does not model; simulate() takes the reference (the engine's scheduler) for these.
FAST_MODEL_COVERS = (
    "FCFS scheduling with chunked prefill, max_num_seqs <= max_num_batched_tokens, recompute "
    "preemption, no prefix caching (no shared prefixes), no SLO targets, one API process per "
    "replica, least-outstanding or round-robin routing, no autoscaling, no router CPU queue, no pipeline "
    "stages"
)


def fast_model_gap(
    config: SimConfig, prefix_caching: bool, custom_step_cost: bool, autoscale: bool
) -> str | None:
    """Why the fast replica model cannot run this configuration (None: it can)."""
    reasons = [
        (prefix_caching, "prefix caching"),
        (
            config.slo_ttft_s is not None or config.slo_tpot_s is not None,
            "SLO-aware scheduling and admission",
        ),
        (config.router == "prefix-affinity", "prefix-affinity routing"),
        (config.api_server_count != 1, "more than one API process per replica"),
        (config.max_num_batched_tokens < config.max_num_seqs, "max_num_batched_tokens < max_num_seqs"),
        (custom_step_cost, "a step cost other than the calibrated StepCost"),
        (autoscale, "autoscaling"),
        (config.router_costs.enabled, "the router's CPU queue"),
        (config.pp > 1, "pipeline parallelism (pipeline.py)"),
        (config.disaggregation is not None, "prefill/decode disaggregation (disaggregated.py)"),
        (bool(config.replica_failures), "replica failures (failures.py)"),
        (bool(config.replica_hangs), "replica hangs (failures.py)"),
        (config.max_outstanding is not None, "the router's --max-outstanding (router_admission.py)"),
        (config.core_latency_s > 0, "a latency inside the server (SimConfig.core_latency_s)"),
    ]
    gaps = [why for hit, why in reasons if hit]
    return ", ".join(gaps) if gaps else None


def run_fast(
    config: SimConfig,
    trace: Trace,
    make_replica: Callable[[int, Callable], FastReplica],
    recorder: RunRecorder,
    progress: Callable[[float], None] | None = None,
) -> tuple[list, list[dict]]:
    """Run the trace through config.num_replicas fast replicas; returns them and the fleet's timeline."""
    index = LeastOutstandingIndex(config.num_replicas)
    replicas = [make_replica(i, index.drop) for i in range(config.num_replicas)]
    round_robin = itertools.count() if config.router == "round-robin" else None
    steps: list[tuple] = [(math.inf, -1, WAKE, 0)]  # a sentinel under every event: never empty
    for rep in replicas:  # each replica's step events: (time, its index, kind, its version then)
        rep.events = steps
    prompts, outputs = trace.prompt_len.tolist(), trace.output_len.tolist()
    arrivals = trace.arrival_s.tolist()
    n, i = len(arrivals), 0
    delay = config.frontend_latency_s
    counts, max_attempts = index.counts, config.max_attempts
    take = index.take
    # the common case in one call (FastReplica.arrive): least-outstanding, the API process's queue, a first try
    arrive_first = round_robin is None and max_attempts > 0 and config.frontend_costs.enabled

    def admit(rep: FastReplica, j: int, now: float) -> bool:
        k = rep.index
        end = rep.interrupt(now)
        if end is not None:  # its decode segment is cut at now: a step ending at `end` is in flight
            v = rep.version = rep.version + 1
            rep.next_end = end
            heappush(steps, (end, k, STEP_END, v))
        if not rep.try_add(arrivals[j], prompts[j], outputs[j]):
            index.add(k, -1)  # a 429 back at the router
            recorder.reject_latency_s.append(now - arrivals[j])
            return False
        if not rep.busy:  # wake it after every arrival of this instant is queued
            rep.busy = True
            v = rep.version = rep.version + 1
            rep.next_end = now
            heappush(steps, (now, k, WAKE, v))
        return True

    def send(j: int, now: float, tried: tuple[int, ...]) -> None:
        while len(tried) < max_attempts:
            if round_robin is None:
                if not tried:
                    rep = replicas[take()]
                else:
                    k = index.choose(tried)
                    if k is None:
                        break
                    rep = replicas[k]
                    index.add(k, 1)
            else:
                candidates = [r for r in replicas if r.index not in tried] if tried else replicas
                if not candidates:
                    break
                rep = candidates[next(round_robin) % len(candidates)]  # RoundRobin.choose's rule
                index.add(rep.index, 1)
            reached = rep.intake(now)
            if reached > now:
                if not rep.pending and rep.next_end >= reached and rep.will_take(prompts[j], outputs[j]):
                    # nothing happens on this replica before its core gets the request, and it will queue it:
                    # admit it now (as of `reached`) rather than through an event
                    admit(rep, j, reached)
                    return
                rep.pending += 1
                k = rep.index
                heappush(steps, (reached, k, ADMIT, (j, (*tried, k))))
                return
            if admit(rep, j, now):
                return
            tried = (*tried, rep.index)
        recorder.num_rejected += 1

    inf = math.inf
    tick = arrivals[-1] / 100 if n and arrivals[-1] > 0 else inf
    timeline: list[dict] = []
    # The timeline's ticks are events too, at the float just below each tick time and an index past the
    # replicas': each is taken after every arrival and event before the tick and before any at or after it
    # (a test per event less). by_index reads a replica for it that it never uses (its version is never None).
    num = len(replicas)
    by_index = [*replicas, replicas[-1]]

    def sample(t: float) -> None:
        """The timeline's point at tick t."""
        timeline.append(
            {
                "t": t,
                "waiting": sum(r.num_waiting for r in replicas),
                "running": sum(r.num_running for r in replicas),
            }
        )
        recorder.flush_itl()  # raw gaps binned as the run goes (an hour holds ~50 M steps)
        if progress is not None:
            progress(t)

    next_tick = tick
    if tick < inf:
        heappush(steps, (math.nextafter(next_tick, -inf), num, TICK, None))
    arrivals.append(inf)  # past the last request: no arrival left (n is the trace's length)
    next_arrival = arrivals[0] + delay
    while True:
        event = steps[0]
        now = event[0]
        if next_arrival <= now:  # arrivals first at equal times
            if i == n:
                break  # no arrival left and no event but the sentinel
            if arrive_first:
                k = take()
                rep = replicas[k]
                reached = rep.arrive(next_arrival, arrivals[i], prompts[i], outputs[i])
                if reached >= 0.0:  # not admitted at once: send's other cases
                    if reached > next_arrival:
                        rep.pending += 1
                        heappush(steps, (reached, k, ADMIT, (i, (k,))))
                    elif not admit(rep, i, next_arrival):
                        send(i, next_arrival, (k,))
            else:
                send(i, next_arrival, ())
            i += 1
            next_arrival = arrivals[i] + delay
            continue
        _, idx, kind, ver = event
        rep = by_index[idx]
        if ver != rep.version:  # (an admission's ver is a tuple, a tick's None: never a version)
            if kind == STEP_END:  # a decode segment that an arrival cut short
                heappop(steps)
            elif kind == ADMIT:  # through its API process: the core gets it now
                heappop(steps)
                j, tried = ver
                rep.pending -= 1
                if not admit(rep, j, now):
                    send(j, now, tried)
            elif kind == TICK:  # sampled if an arrival or event (a stale one too) comes at or after it
                if i < n or len(steps) > 2:
                    sample(next_tick)
                    next_tick += tick
                    heapreplace(steps, (math.nextafter(next_tick, -inf), num, TICK, None))
                else:
                    heappop(steps)
            else:  # (a stale wake-up)
                heappop(steps)
            continue
        end = rep.next_step(now) if kind == STEP_END else rep.start_step(now)
        if end is None:
            heappop(steps)
            rep.next_end = inf
        else:  # its next step or segment takes this event's place (the replica touched no other event)
            v = rep.version = ver + 1
            rep.next_end = end
            heapreplace(steps, (end, idx, STEP_END, v))
    assert sum(counts) == 0, "every request sent was finished or refused"
    return replicas, timeline
