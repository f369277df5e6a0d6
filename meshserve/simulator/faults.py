"""A replica killed and restarted under a closed-loop client: the router fault suite's load in simulated time.

The client (tests/router/loadgen.py's Load) keeps `concurrency` requests in flight: a worker sends its next request
the moment its last one ends, every `stream_every`-th request (by index) streams. The scenario is the suite's
kill+restart (tests/router/test_router_faults.py): once the client has sent `kill_after_sent` requests, the victim
is SIGKILLed as soon as one of its streams is fresh (its first token out, not yet its second); it is restarted
when `restart_after_sent` were sent, answers /ready `start_s` later, and the load stops once `stop_after_sent` were
sent and the victim has served `stop_after_served` requests since its re-admission.

The router as meshserve/router/proxy.py and health.py run it: least outstanding among the admitted replicas; a
request is committed once something reached the client (a non-streamed answer whole, a stream's first event).
The kill resets the victim's connections: the router ejects it at once, a stream already committed ends with
the clean error event, every other request on it (queued, running, or non-streamed part-way) goes to another
replica, at most `max_attempts` tries. A restarted replica is re-admitted after `recover_threshold` good probes,
one every `health_interval_s` from the router's start. Per request the client's time is a fixed `latency_s`
(router, HTTP, tokenizing: the costs the step trace does not see) plus its replica's queue and steps.

Replicas are meshserve/simulator/replica.py's SimReplica (the engine's Scheduler, every step through it), with
no front-end queue: the step cost is meant to be the replica's measured step cadence, which carries its API
work (the suite's replicas run the engine in the server's thread). Not modelled: CPU shared between processes
(the suite's replicas and the restarting one share two cores), the router's own CPU, the fallback replica.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from meshserve.engine.step_time import StepShape
from meshserve.router.policy import make_policy
from meshserve.simulator.config import SimConfig
from meshserve.simulator.failures import FailureLog, committed
from meshserve.simulator.metrics import RunRecorder
from meshserve.simulator.replica import SimReplica
from meshserve.simulator.trace import SimRequest


@dataclass(frozen=True)
class ClosedLoopLoad:
    """Load(concurrency, stream_every, max_tokens, stream_max_tokens) of tests/router/loadgen.py, prompt_len
    tokens each (the suite's prompt is 34-35 tokens with the tiny checkpoint's tokenizer)."""

    concurrency: int = 12
    stream_every: int = 4
    output_len: int = 8
    stream_output_len: int = 200
    prompt_len: int = 35

    def is_stream(self, index: int) -> bool:
        return self.stream_every > 0 and index % self.stream_every == self.stream_every - 1


@dataclass(frozen=True)
class KillRestart:
    """The suite's kill+restart of one replica (the default scenario: victim 1 of 3, total 300, after 10)."""

    victim: int = 1
    kill_after_sent: int = 75
    restart_after_sent: int = 150
    start_s: float = 8.0  # from the restart to /ready (measured: the process's imports and load)
    stop_after_sent: int = 300
    stop_after_served: int = 10


@dataclass(frozen=True)
class RouterHealth:
    """The suite's router flags that matter here (--health-interval, --recover-threshold, --max-attempts)."""

    health_interval_s: float = 0.5
    recover_threshold: int = 2
    max_attempts: int = 3


@dataclass
class RequestResult:
    """One request's fate, as loadgen.Result reports it: outcome "ok" or "clean_error" (a cut stream, or no
    replica left to try), the replica that answered, the attempts, the phase it was sent in."""

    index: int
    stream: bool
    sent_s: float
    phase: str
    attempts: int = 1
    outcome: str = ""
    replica: int | None = None
    end_s: float = math.nan

    @property
    def seconds(self) -> float:
        return self.end_s - self.sent_s


@dataclass
class FaultRun:
    """What run_kill_restart returns: every request, the events' times, and the suite's figures."""

    requests: list[RequestResult]
    events: dict[str, float]
    steps: list[int] = field(default_factory=list)  # per replica slot, every incarnation's steps

    def figures(self) -> dict:
        """tests/router/loadgen.figures of the run (no fallback, nothing lost here)."""
        reqs = self.requests
        return {"sent": len(reqs), "succeeded": sum(r.outcome == "ok" for r in reqs),
                "retried": sum(r.attempts > 1 for r in reqs), "failed_cleanly": sum(r.outcome == "clean_error"
                                                                                    for r in reqs),
                "seconds": round(max((r.end_s for r in reqs), default=0.0), 1)}


class _Replica(SimReplica):
    """A SimReplica that reports each finished request (its index and the client's time of its last token)."""

    def __init__(self, *args, on_finish: Callable[[int, float], None], **kwargs):
        super().__init__(*args, **kwargs)
        self.on_finish = on_finish

    def _finish(self, seq, last_token_s: float) -> None:
        super()._finish(seq, last_token_s)
        self.on_finish(int(seq.seq_id), last_token_s)

    def num_tokens_out(self, index: int) -> int:
        """Tokens of request `index` out so far (0: not running or none yet)."""
        for seq in self.scheduler.running:
            if seq.seq_id == str(index):
                return seq.num_output_tokens
        return 0


# event kinds, in the order they go at equal times
_SEND, _ADMIT, _STEP_END, _WAKE, _READY, _READMIT = range(6)


def run_kill_restart(config: SimConfig, step_cost: Callable[[StepShape], float], load: ClosedLoopLoad,
                     scenario: KillRestart, health: RouterHealth = RouterHealth(), latency_s: float = 0.0,
                     limit_s: float = 3600.0) -> FaultRun:
    """Simulate the scenario on config's replicas (num_gpus // gpus per replica of them) with step_cost per
    step; latency_s is added to every request once (between its sending and its replica's core). Deterministic:
    no randomness (ties go by event kind, then order of pushing)."""
    config.validate()
    num_blocks = config.kv_blocks(config.model_spec(), config.gpu_spec())
    sched_cfg, cache_cfg = config.engine_configs(num_blocks, False)
    recorder = RunRecorder()
    reqs: list[RequestResult] = []
    where: dict[int, tuple[int, int]] = {}  # request in flight -> (replica slot, incarnation)
    tried: dict[int, set[int]] = {}
    events: dict[str, float] = {}
    heap: list[tuple] = []
    counter = 0
    incarnation = [0] * config.num_replicas
    version = [0] * config.num_replicas
    steps = [0] * config.num_replicas
    served_since_readmit = [0]
    policy = make_policy("least-outstanding")
    state = {"killed": False, "restarted": False, "stopped": False}

    def push(t: float, kind: int, payload) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(heap, (t, kind, counter, payload))

    def make(slot: int) -> _Replica:
        incarnation[slot] += 1
        return _Replica(slot, sched_cfg, cache_cfg, step_cost, recorder, config.max_queue_len, fast_forward=False,
                        light=True, frontend=None, on_finish=finished)

    def phase() -> str:
        if not state["killed"]:
            return "start"
        if not state["restarted"]:
            return "dead"
        return "readmitted" if "readmitted_s" in events else "restarting"

    def end(j: int, t: float, outcome: str, replica: int | None) -> None:
        r = reqs[j]
        r.outcome, r.end_s, r.replica = outcome, t, replica
        where.pop(j, None)
        if replica == scenario.victim and r.phase == "readmitted":
            served_since_readmit[0] += 1
        check_stop()
        if not state["stopped"]:
            push(t, _SEND, None)  # the worker's next request

    def check_stop() -> None:
        """The suite stops the load once `total` were sent, 20 more since the re-admission, and the victim
        served `after` of those."""
        if "readmitted_s" in events and len(reqs) >= max(scenario.stop_after_sent, events["readmitted_sent"] + 20) \
                and served_since_readmit[0] >= scenario.stop_after_served:
            state["stopped"] = True

    def finished(j: int, t: float) -> None:
        end(j, t, "ok", where[j][0])

    def route(j: int, t: float) -> None:
        """Send request j to an admitted replica it has not tried; none left: the client gets a clean 503."""
        candidates = [rep for rep in serving if rep.index not in tried[j]]
        if not candidates or reqs[j].attempts > health.max_attempts:
            end(j, t, "clean_error", None)
            return
        rep = policy.choose(candidates, None)
        rep.outstanding += 1
        tried[j].add(rep.index)
        where[j] = (rep.index, incarnation[rep.index])
        push(t + latency_s, _ADMIT, (j, rep.index, incarnation[rep.index]))

    def send(t: float) -> None:
        j = len(reqs)
        if state["stopped"]:
            return
        stream = load.is_stream(j)
        reqs.append(RequestResult(j, stream, t, phase()))
        tried[j] = set()
        route(j, t)
        if len(reqs) >= scenario.restart_after_sent and state["killed"] and not state["restarted"]:
            restart(t)
        check_stop()

    def kill(t: float) -> None:
        state["killed"] = True
        events["kill_s"], events["kill_sent"] = t, len(reqs)
        slot = scenario.victim
        rep = replicas[slot]
        serving.remove(rep)
        replicas[slot] = None
        version[slot] += 1
        for j, (s, inc) in sorted(where.items()):
            if s != slot or inc != incarnation[slot]:
                continue
            if committed(rep, str(j), reqs[j].stream):  # the stream ends with its error event
                end(j, t, "clean_error", slot)
            else:  # not committed: the router tries another replica
                reqs[j].attempts += 1
                route(j, t)

    def restart(t: float) -> None:
        state["restarted"] = True
        events["restart_s"] = t
        push(t + scenario.start_s, _READY, scenario.victim)

    def fresh_stream_on(slot: int, t: float) -> None:
        """Kill the victim now if one of its streams has its first token out and not yet its second."""
        rep = replicas[slot]
        if any(s == slot and reqs[j].stream and rep.num_tokens_out(j) == 1 for j, (s, _inc) in where.items()):
            kill(t)

    replicas: list[_Replica | None] = []
    for slot in range(config.num_replicas):
        replicas.append(make(slot))
    serving = list(replicas)
    for _ in range(load.concurrency):
        push(0.0, _SEND, None)
    kill_armed = False  # sent enough: kill at the victim's next fresh stream
    now = 0.0
    while heap:
        now, kind, _, payload = heapq.heappop(heap)
        if now > limit_s:
            break
        if kind == _SEND:
            send(now)
            if not state["killed"] and not kill_armed and len(reqs) >= scenario.kill_after_sent:
                kill_armed = True
                fresh_stream_on(scenario.victim, now)
        elif kind == _ADMIT:
            j, slot, inc = payload
            rep = replicas[slot]
            if where.get(j) != (slot, inc) or rep is None:
                continue  # sent before a kill that already moved it
            if not rep.try_add(j, SimRequest(reqs[j].sent_s, load.prompt_len,
                                             load.stream_output_len if reqs[j].stream else load.output_len), now):
                rep.outstanding -= 1  # a 429: the router tries another replica (an attempt spent)
                reqs[j].attempts += 1
                route(j, now)
                continue
            if not rep.busy:
                rep.busy = True
                version[slot] += 1
                push(now, _WAKE, (slot, version[slot]))
        elif kind in (_STEP_END, _WAKE):
            slot, ver = payload
            rep = replicas[slot]
            if rep is None or ver != version[slot]:
                continue
            if kind == _STEP_END:
                rep.end_step(now)
            t_end = rep.start_step(now)
            if t_end is not None:
                steps[slot] += 1
                version[slot] += 1
                push(t_end, _STEP_END, (slot, version[slot]))
            if kill_armed and not state["killed"] and slot == scenario.victim and kind == _STEP_END:
                fresh_stream_on(slot, now)
        elif kind == _READY:
            slot = payload
            replicas[slot] = make(slot)
            events["ready_s"] = now
            push(FailureLog(health_interval_s=health.health_interval_s, recover_threshold=health.recover_threshold)
                 .readmit_s(now), _READMIT, slot)
        elif kind == _READMIT:
            serving.append(replicas[payload])
            serving.sort(key=lambda r: r.index)
            events["readmitted_s"], events["readmitted_sent"] = now, len(reqs)
    return FaultRun(reqs, events, steps)
