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
work (the suite's replicas run the engine in the server's thread). The CPU the processes share (the suite's
replicas, router workers, client and the restarting replica on two cores) is host_share.py's SharedHost, off unless
given (`host`): each step's time scaled by the processor-sharing factor of the processes busy at its start over
the fit's. Not modelled: the router's own CPU in the per-request latency, the fallback replica.

ClosedLoop is the client, router and replicas; the scenarios hook into it: KillRestartRun here, the hung replica
(faults_hang.py: a replica that answers nothing, the router's read timeout and probes) and the overload bursts
(faults_overload.py: the router's --max-outstanding, router_admission.py, and the replicas' queue limits), and the
slow test's three kill+restart cycles (faults_cycles.py: KillRestartRun once per replica, a load per cycle).
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
from meshserve.simulator.host_share import SharedHost
from meshserve.simulator.metrics import RunRecorder
from meshserve.simulator.replica import SimReplica
from meshserve.simulator.router_admission import RouterAdmission
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
    """The suite's router flags that matter here (--health-interval, --recover-threshold, --max-attempts,
    --health-timeout, --fail-threshold, --read-timeout)."""

    health_interval_s: float = 0.5
    recover_threshold: int = 2
    max_attempts: int = 3
    health_timeout_s: float = 1.0
    fail_threshold: int = 2
    read_timeout_s: float = 4.0


SUITE_HEALTH = RouterHealth()


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
    status: int = 200  # a clean error's: 503 (the router: past --max-outstanding, or no replica), 429 (the replicas')

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

    def last_token_s(self, index: int) -> float:
        """When request `index`'s latest token reached the client (it has one out)."""
        return self._last_token_s[str(index)]

    def num_tokens_out(self, index: int) -> int:
        """Tokens of request `index` out so far (0: not running or none yet)."""
        for seq in self.scheduler.running:
            if seq.seq_id == str(index):
                return seq.num_output_tokens
        return 0


# event kinds, in the order they go at equal times (the scenarios' own after the engine's)
_SEND, _ADMIT, _STEP_END, _WAKE, _READY, _READMIT, _TIMEOUT, _EJECT, _REFUSED, _ARRIVE, _RETURN = range(11)


class ClosedLoop:
    """One run of the closed-loop client against the router and config's replicas (num_gpus // gpus per replica
    of them), step_cost per step, latency_s added to every attempt once (between the router sending it and its
    replica's core). The scenarios (KillRestartRun here; faults_hang.py, faults_overload.py) subclass it and
    hook in: phase(), on_sent(), on_end(), on_step_end(), handle() for their own events. With `admission`
    (router_admission.py) the router refuses past --max-outstanding: the client gets its 503 refusal_s later.
    With `host` (host_share.py) every step's time is scaled by the host's CPU share at its start (replicas with
    work, processes starting, the host's others) over the fit's; None: the step cost as given. Deterministic: no
    randomness (ties go by event kind, then order of pushing)."""

    def __init__(self, config: SimConfig, step_cost: Callable[[StepShape], float], load: ClosedLoopLoad,
                 health: RouterHealth = RouterHealth(), latency_s: float = 0.0,
                 admission: RouterAdmission | None = None, refusal_s: float = 0.0, front_s: float = 0.0,
                 back_s: float = 0.0, host: SharedHost | None = None):
        config.validate()
        num_blocks = config.kv_blocks(config.model_spec(), config.gpu_spec())
        self.config, self.step_cost, self.load, self.health = config, step_cost, load, health
        self.latency_s, self.admission, self.refusal_s = latency_s, admission, refusal_s
        self.front_s, self.back_s = front_s, back_s
        self.host = host
        self.starting: set[int] = set()  # replica slots whose process is starting (restart to /ready)
        self.sched_cfg, self.cache_cfg = config.engine_configs(num_blocks, False)
        self.recorder = RunRecorder()
        self.reqs: list[RequestResult] = []
        self.where: dict[int, tuple[int, int]] = {}  # request in flight -> (replica slot, incarnation)
        self.tried: dict[int, set[int]] = {}
        self.attempt_s: dict[int, float] = {}  # request in flight -> when the router sent its current attempt
        self.worker: dict[int, int] = {}  # request in flight -> the router worker counting it (admission)
        self.events: dict[str, float] = {}
        self.heap: list[tuple] = []
        self.counter = 0
        self.incarnation = [0] * config.num_replicas
        self.version = [0] * config.num_replicas
        self.steps = [0] * config.num_replicas
        self.frozen: dict[int, float] = {}  # a hung replica -> since when (SIGSTOP: it answers nothing)
        self.policy = make_policy("least-outstanding")
        self.stopped = False
        self.load_id = 0  # the current load (a burst): a client of an earlier one sends no more
        self.load_start = 0  # the current load's first request (its requests' indices start again at 0)
        self.replicas: list[_Replica | None] = [self.make(slot) for slot in range(config.num_replicas)]
        self.serving = list(self.replicas)

    # -- the scenario's hooks --------------------------------------------------------------------
    def phase(self) -> str:
        return "start"

    def on_sent(self, t: float) -> None:
        """After each request the client sent."""

    def on_end(self, j: int, t: float) -> None:
        """After request j ended (before its client sends its next)."""

    def on_step_end(self, slot: int, t: float) -> None:
        """After a step of replica slot ended (and its next began)."""

    def handle(self, kind: int, payload, t: float) -> None:
        """An event of the scenario's own kinds."""

    def may_send(self) -> bool:
        """Whether a client sends its next request now."""
        return not self.stopped

    # -- the engine ------------------------------------------------------------------------------
    def push(self, t: float, kind: int, payload) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (t, kind, self.counter, payload))

    def make(self, slot: int) -> _Replica:
        self.incarnation[slot] += 1
        step_cost = self.step_cost
        if self.host is not None:
            def step_cost(shape: StepShape, slot: int = slot) -> float:
                return self.step_cost(shape) * self.host_slowdown(slot)
        return _Replica(slot, self.sched_cfg, self.cache_cfg, step_cost, self.recorder,
                        self.config.max_queue_len, fast_forward=False, light=True, frontend=None,
                        on_finish=self.finished)

    def host_slowdown(self, slot: int) -> float:
        """The host's step-time factor for a step replica slot starts now: the replicas with work (slot's, about to
        step, among them; a dead or stopped one not), the processes starting, over the fit's (SharedHost)."""
        busy = sum(1 for s, rep in enumerate(self.replicas)
                   if rep is not None and s not in self.frozen and (rep.busy or s == slot))
        return self.host.slowdown(busy, len(self.starting), len(self.replicas))

    def start_load(self, t: float) -> None:
        """A new load (a burst) from t: its clients send at once."""
        self.load_id += 1
        self.load_start = len(self.reqs)
        for _ in range(self.load.concurrency):
            self.push(t, _SEND, self.load_id)

    def end(self, j: int, t: float, outcome: str, replica: int | None) -> None:
        """Request j's answer ends at the router at t: an answer reaches its client back_s later."""
        r = self.reqs[j]
        r.outcome, r.replica = outcome, replica
        self.where.pop(j, None)
        worker = self.worker.pop(j, None)
        if worker is not None:
            self.admission.release(worker)
        if outcome == "ok" and self.back_s:
            self.push(t + self.back_s, _RETURN, j)
        else:
            self.deliver(j, t)

    def deliver(self, j: int, t: float) -> None:
        """Request j's end reaches its client at t, who sends its next request."""
        self.reqs[j].end_s = t
        load_id = self.load_id  # (on_end may start the next load: this client is of the last one)
        self.on_end(j, t)
        if not self.stopped:
            self.push(t, _SEND, load_id)  # the worker's next request

    def finished(self, j: int, t: float) -> None:
        self.end(j, t, "ok", self.where[j][0])

    def route(self, j: int, t: float) -> None:
        """Send request j to an admitted replica it has not tried; none left: the client gets a clean 503 (or
        the last replica's 429 passed on)."""
        candidates = [rep for rep in self.serving if rep.index not in self.tried[j]]
        if not candidates or self.reqs[j].attempts > self.health.max_attempts:
            if self.reqs[j].status == 429:
                self.reqs[j].attempts = len(self.tried[j])
            else:
                self.reqs[j].status = 503
            self.end(j, t, "clean_error", None)
            return
        rep = self.policy.choose(candidates, None)
        rep.outstanding += 1
        self.tried[j].add(rep.index)
        self.where[j] = (rep.index, self.incarnation[rep.index])
        self.attempt_s[j] = t
        if rep.index in self.frozen:  # it will never answer: the router's read timeout ends the attempt
            self.push(t + self.health.read_timeout_s, _TIMEOUT, (j, rep.index, self.incarnation[rep.index]))
        self.push(t + self.latency_s, _ADMIT, (j, rep.index, self.incarnation[rep.index]))

    def send(self, t: float, load_id: int) -> None:
        j = len(self.reqs)
        if load_id != self.load_id or not self.may_send():
            return
        stream = self.load.is_stream(j - self.load_start)
        self.reqs.append(RequestResult(j, stream, t, self.phase()))
        self.tried[j] = set()
        if self.front_s:
            self.push(t + self.front_s, _ARRIVE, j)
        else:
            self.arrive(j, t)
        self.on_sent(t)

    def arrive(self, j: int, t: float) -> None:
        """Request j reaches the router at t: past --max-outstanding it is refused (its 503 reaches the client
        refusal_s later), else routed."""
        if self.admission is not None:
            worker = self.admission.admit()
            if worker is None:  # a 503 at once, no replica tried
                self.reqs[j].status = 503
                self.push(t + self.refusal_s, _REFUSED, j)
                return
            self.worker[j] = worker
        self.route(j, t)

    def hang(self, slot: int, t: float) -> None:
        """Replica slot stops answering at t for the rest of the run: its own events are never seen, each request
        on it ends at the router's read timeout (a committed stream's from its last token, any other's from its
        attempt), and the probes eject it (probe_ejection_s)."""
        self.frozen[slot] = t
        rep = self.replicas[slot]
        for j, (s, inc) in sorted(self.where.items()):
            if s != slot:
                continue
            since = (rep.last_token_s(j) if committed(rep, str(j), self.reqs[j].stream) else self.attempt_s[j])
            self.push(since + self.health.read_timeout_s, _TIMEOUT, (j, slot, inc))
        self.push(probe_ejection_s(t, self.health), _EJECT, slot)

    def eject(self, slot: int, t: float) -> None:
        rep = self.replicas[slot]
        if rep in self.serving:
            self.serving.remove(rep)
            self.events.setdefault("ejected_s", t)

    def timed_out(self, j: int, slot: int, t: float) -> None:
        """The router's read timeout on request j's attempt at slot: it ejects the replica; a committed stream
        ends with its error event, anything else goes to another replica."""
        rep = self.replicas[slot]
        self.eject(slot, t)
        rep.outstanding -= 1
        if committed(rep, str(j), self.reqs[j].stream):
            self.end(j, t, "clean_error", slot)
        else:
            self.reqs[j].attempts += 1
            self.route(j, t)

    def run(self, limit_s: float = 3600.0) -> FaultRun:
        self.start_load(0.0)
        while self.heap:
            now, kind, _, payload = heapq.heappop(self.heap)
            if now > limit_s:
                break
            if kind == _SEND:
                self.send(now, payload)
            elif kind == _ADMIT:
                j, slot, inc = payload
                rep = self.replicas[slot]
                if self.where.get(j) != (slot, inc) or rep is None or slot in self.frozen:
                    continue  # sent before a kill that already moved it, or to a replica that answers nothing
                if not rep.try_add(j, SimRequest(self.reqs[j].sent_s, self.load.prompt_len,
                                                 self.load.stream_output_len if self.reqs[j].stream
                                                 else self.load.output_len), now):
                    rep.outstanding -= 1  # a 429: the router tries another replica (an attempt spent)
                    self.reqs[j].status = 429
                    self.reqs[j].attempts += 1
                    self.route(j, now)
                    continue
                if not rep.busy:
                    rep.busy = True
                    self.version[slot] += 1
                    self.push(now, _WAKE, (slot, self.version[slot]))
            elif kind in (_STEP_END, _WAKE):
                slot, ver = payload
                rep = self.replicas[slot]
                if rep is None or ver != self.version[slot] or slot in self.frozen:
                    continue
                if kind == _STEP_END:
                    rep.end_step(now)
                t_end = rep.start_step(now)
                if t_end is not None:
                    self.steps[slot] += 1
                    self.version[slot] += 1
                    self.push(t_end, _STEP_END, (slot, self.version[slot]))
                if kind == _STEP_END:
                    self.on_step_end(slot, now)
            elif kind == _TIMEOUT:
                j, slot, inc = payload
                if self.where.get(j) == (slot, inc):
                    self.timed_out(j, slot, now)
            elif kind == _EJECT:
                self.eject(payload, now)
                self.handle(kind, payload, now)
            elif kind == _REFUSED:
                self.end(payload, now, "clean_error", None)
            elif kind == _ARRIVE:
                self.arrive(payload, now)
            elif kind == _RETURN:
                self.deliver(payload, now)
            else:
                self.handle(kind, payload, now)
        return FaultRun(self.reqs, self.events, self.steps)


def probe_ejection_s(hung_s: float, health: RouterHealth) -> float:
    """When the router's probes eject a replica that stops answering at hung_s for good (failures.py's
    FailureLog.hang_probes: health.py's loop, each failing round waiting out the probe's timeout)."""
    return FailureLog(health_interval_s=health.health_interval_s, health_timeout_s=health.health_timeout_s,
                      fail_threshold=health.fail_threshold).probe_ejection_s(hung_s)


class KillRestartRun(ClosedLoop):
    """The suite's kill+restart (KillRestart) on the closed loop."""

    def __init__(self, *args, scenario: KillRestart, **kwargs):
        super().__init__(*args, **kwargs)
        self.scenario = scenario
        self.served_since_readmit = 0
        self.killed = self.restarted = False
        self.kill_armed = False  # sent enough: kill at the victim's next fresh stream

    def sent(self) -> int:
        """Requests the current load sent (its counts start at 0: faults_cycles.py runs a load per cycle)."""
        return len(self.reqs) - self.load_start

    def phase(self) -> str:
        if not self.killed:
            return "start"
        if not self.restarted:
            return "dead"
        return "readmitted" if "readmitted_s" in self.events else "restarting"

    def on_end(self, j: int, t: float) -> None:
        r = self.reqs[j]
        if r.replica == self.scenario.victim and r.phase == "readmitted":
            self.served_since_readmit += 1
        self.check_stop()

    def check_stop(self) -> None:
        """The suite stops the load once `total` were sent, 20 more since the re-admission, and the victim
        served `after` of those."""
        sc, ev = self.scenario, self.events
        if "readmitted_s" in ev and self.sent() >= max(sc.stop_after_sent, ev["readmitted_sent"] + 20) \
                and self.served_since_readmit >= sc.stop_after_served:
            self.stopped = True

    def on_sent(self, t: float) -> None:
        if self.sent() >= self.scenario.restart_after_sent and self.killed and not self.restarted:
            self.restart(t)
        self.check_stop()
        if not self.killed and not self.kill_armed and self.sent() >= self.scenario.kill_after_sent:
            self.kill_armed = True
            self.fresh_stream_on(self.scenario.victim, t)

    def on_step_end(self, slot: int, t: float) -> None:
        if self.kill_armed and not self.killed and slot == self.scenario.victim:
            self.fresh_stream_on(slot, t)

    def kill(self, t: float) -> None:
        self.killed = True
        self.events["kill_s"], self.events["kill_sent"] = t, self.sent()
        slot = self.scenario.victim
        rep = self.replicas[slot]
        self.serving.remove(rep)
        self.replicas[slot] = None
        self.version[slot] += 1
        for j, (s, inc) in sorted(self.where.items()):
            if s != slot or inc != self.incarnation[slot]:
                continue
            if committed(rep, str(j), self.reqs[j].stream):  # the stream ends with its error event
                self.end(j, t, "clean_error", slot)
            else:  # not committed: the router tries another replica
                self.reqs[j].attempts += 1
                self.route(j, t)

    def restart(self, t: float) -> None:
        self.restarted = True
        self.events["restart_s"] = t
        self.starting.add(self.scenario.victim)
        self.push(t + self.scenario.start_s, _READY, self.scenario.victim)

    def fresh_stream_on(self, slot: int, t: float) -> None:
        """Kill the victim now if one of its streams has its first token out and not yet its second."""
        rep = self.replicas[slot]
        if any(s == slot and self.reqs[j].stream and rep.num_tokens_out(j) == 1
               for j, (s, _inc) in self.where.items()):
            self.kill(t)

    def handle(self, kind: int, payload, t: float) -> None:
        if kind == _READY:
            slot = payload
            self.replicas[slot] = self.make(slot)
            self.starting.discard(slot)
            self.events["ready_s"] = t
            self.push(FailureLog(health_interval_s=self.health.health_interval_s,
                                 recover_threshold=self.health.recover_threshold).readmit_s(t), _READMIT, slot)
        elif kind == _READMIT:
            self.serving.append(self.replicas[payload])
            self.serving.sort(key=lambda r: r.index)
            self.events["readmitted_s"], self.events["readmitted_sent"] = t, self.sent()


def run_kill_restart(config: SimConfig, step_cost: Callable[[StepShape], float], load: ClosedLoopLoad,
                     scenario: KillRestart, health: RouterHealth = RouterHealth(), latency_s: float = 0.0,
                     limit_s: float = 3600.0, host: SharedHost | None = None) -> FaultRun:
    """Simulate the kill+restart scenario (ClosedLoop's arguments)."""
    return KillRestartRun(config, step_cost, load, health, latency_s, scenario=scenario, host=host).run(limit_s)
