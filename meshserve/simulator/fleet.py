"""The event loop: arrivals go through a router policy to replicas, whose steps end at simulated times.

Events: the next arrival of the trace; and in a heap keyed by time, then replica index, then kind (so ties
resolve the same way every run): a request reaching a replica's core through its API process, a replica's step
(or a decode run's laid-out steps) ending, an idle replica waking, sequences finishing inside a decode run (the
router's count drops then). Arrivals go first at equal times: a replica idle when requests arrive wakes once all of that instant's arrivals are queued, and starts a
step; a replica whose step ends starts its next one at that moment if it has work. The router is
meshserve/router/policy.py's, run on SimReplica objects (they carry the `outstanding` and `url` it reads); a
request refused with 429 is retried on another replica, up to max_attempts, as `meshserve router` does. With a
router node (router_node.py: the router process's CPU as a queue) a request reaches the policy when the router
has taken it in (a router event, replica index -1), a 429 goes back through the router before the next try,
and every streamed token passes through it after its replica's API process (replica.py).
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable

from meshserve.errors import InvalidArgumentError
from meshserve.router.policy import make_policy
from meshserve.router.prefix import prefix_key
from meshserve.simulator import native
from meshserve.simulator.autoscale import Autoscaler, AutoscaleRule
from meshserve.simulator.config import SimConfig
from meshserve.simulator.disaggregated import run_disaggregated
from meshserve.simulator.eager_steps import EagerStepCosts
from meshserve.simulator.failures import FailureLog
from meshserve.simulator.fast_fleet import fast_model_gap, run_fast
from meshserve.simulator.fast_replica import FastReplica
from meshserve.simulator.metrics import RunRecorder
from meshserve.simulator.pipeline import HostCosts, PipelinedReplica, StagePipeline, hop_s, load_host_costs
from meshserve.simulator.replica import SimReplica, push_step_end
from meshserve.simulator.router_admission import RouterAdmission
from meshserve.simulator.router_node import RouterNode
from meshserve.simulator.step_cost import (
    StepCost,
    StepWeights,
    TpCosts,
    load_calibration,
    load_eager_costs,
    load_mla_costs,
    load_moe_costs,
    load_tp_costs,
)
from meshserve.simulator.step_noise import NoiseStream, load_step_noise
from meshserve.simulator.trace import SimRequest, Trace, prompt_token_ids

# a request reaches a replica's core through its API process; a replica's step ends; an idle replica got work;
# sequences finish inside a decode run (SimReplica.finish_mark); the router node sends a request on (index -1)
_ROUTE, _ADMIT, _STEP_END, _WAKE, _FINISH = -2, -1, 0, 1, 2
_KILL, _READY, _READMIT = 3, 4, 5  # a replica dies, its restart answers /ready, the router re-admits it (failures.py)
# a replica stops answering, the probes eject it, the router's read timeout ends its requests, it goes on
_HANG, _EJECT, _TIMEOUT, _RESUME = 6, 7, 8, 9  # (failures.py)
_ROUTER_INDEX = -1

logger = logging.getLogger(__name__)


def simulate(config: SimConfig, trace: Trace | list[SimRequest], *, weights: StepWeights | None = None,
             tp_costs: TpCosts | None = None, step_cost: Callable | None = None,
             progress: Callable[[float], None] | None = None,
             fast_forward: bool = True, autoscale: AutoscaleRule | None = None,
             eager: EagerStepCosts | None | str = "calibration") -> dict:
    """Run the trace through the fleet; returns the report (metrics.RunRecorder.summarize, plus the setup).

    weights and tp_costs replace the calibration's step weights and TP costs (validation_offline.fit_tp refits the
    latter), eager its eager steps' costs (eager_steps.py; None: priced by the weights alone); step_cost replaces the calibrated StepCost (tests use fixed durations; with pipeline stages, one callable
    for every stage or a list of one per stage, and no hop between them); progress(sim_time) is called as
    simulated time advances (about every 1% of the trace). fast_forward lays out runs of identical decode
    steps at once and keeps sequences as counts (replica.py, light.py); off, every step goes through the
    scheduler with the engine's own Sequence and BlockManager (the reference: same results, slower). autoscale:
    replicas come and go on the router's queue depth (autoscale.py), starting from config's count.
    config.replica_model "fast" runs the fast replica model (fast_replica.py, fast_fleet.py) where it covers
    the configuration (fast_fleet.fast_model_gap), else the scheduler with the reason logged and reported.
    """
    config.validate()
    trace = Trace.of(trace)
    model, gpu = config.model_spec(), config.gpu_spec()
    fit = config.calibration_section
    cost = StepCost(model, gpu, config.tp, weights or load_calibration(fit), weight_dtype=config.weights_dtype(model),
                    kv_dtype=config.kv_dtype, tp_costs=tp_costs or load_tp_costs(fit), fused_norm=config.tp_fused_norm,
                    ep=config.layout.ep, moe_costs=load_moe_costs(fit) if model.is_moe else None,
                    mla_costs=load_mla_costs(fit) if model.is_mla else None,
                    eager=None if config.pp > 1 else load_eager_costs(fit) if eager == "calibration" else eager)
    noise = load_step_noise(fit) if config.step_noise else None
    stalls = config.frontend_stall_table
    prefix_caching = config.enable_prefix_caching
    if prefix_caching is None:
        prefix_caching = trace.has_prefixes
    num_blocks = config.kv_blocks(model, gpu)
    sched_cfg, cache_cfg = config.engine_configs(num_blocks, prefix_caching)
    recorder = RunRecorder()
    wall0 = time.perf_counter()
    replica_model, fallback = config.replica_model, None
    if replica_model == "fast":
        fallback = fast_model_gap(config, prefix_caching, step_cost is not None, autoscale is not None)
        if fallback is not None:
            logger.info("the fast replica model does not cover %s: simulating with the scheduler", fallback)
            replica_model = "scheduler"
    if replica_model == "fast":
        def make_fast(index: int, on_finish) -> FastReplica:
            return FastReplica(index, sched_cfg, cache_cfg, cost, recorder, config.max_queue_len,
                               config.frontend_costs, on_finish,
                               None if noise is None else NoiseStream(noise, config.seed, index))

        replicas, timeline = run_fast(config, trace, make_fast, recorder, progress)
        return _report(config, trace, recorder, replicas, None, None, timeline, cost, step_cost, num_blocks,
                       prefix_caching, (0, 0), wall0, replica_model, fallback)

    failures = None
    if config.replica_failures or config.replica_hangs:
        failures = FailureLog(health_interval_s=config.health_interval_s, health_timeout_s=config.health_timeout_s,
                              read_timeout_s=config.read_timeout_s, fail_threshold=config.fail_threshold,
                              recover_threshold=config.recover_threshold)
    if failures is not None:
        clash = [why for hit, why in ((autoscale is not None, "--autoscale"), (config.pp > 1, "--pp > 1"),
                                       (config.disaggregation is not None, "--disaggregation"),
                                       (config.router_costs.enabled, "--router-node on")) if hit]
        if clash:
            flag, param = (("--fail-replica", "fail_replica") if config.replica_failures else
                           ("--hang-replica", "hang_replica"))
            raise InvalidArgumentError(f"{flag} is not modelled with {', '.join(clash)}", param=param)
        fast_forward = False  # a kill or hang lands between any two steps: every step through the scheduler
    if config.disaggregation is not None:
        if autoscale is not None:
            raise InvalidArgumentError("--disaggregation is not modelled with --autoscale", param="disaggregation")
        if config.max_outstanding is not None:
            raise InvalidArgumentError("--max-outstanding is not modelled with --disaggregation",
                                       param="max_outstanding")
        return _run_disaggregated(config, trace, sched_cfg, cache_cfg, step_cost, cost, noise, recorder,
                                  fast_forward, progress, num_blocks, prefix_caching, wall0, replica_model, fallback)

    version: list[int] = []  # per replica: only its latest event in `steps` is live
    host = host_costs(config)
    router_node = RouterNode(config.router_costs) if config.router_costs.enabled else None
    # the router node takes jobs from every replica: step by step they come nearly in time order, while decode
    # runs laid out ahead hand theirs in late (W3 DP=2 at QPS 64: TTFT p50 105 ms laid out, 65 ms step by step)
    fast_forward = fast_forward and router_node is None

    def make_replica(index: int) -> SimReplica:
        version.append(0)
        return build_replica(index)

    def build_replica(index: int) -> SimReplica:
        if config.pp > 1:  # stages in series, steps in flight (pipeline.py); the policy predicts whole steps
            return PipelinedReplica(index, sched_cfg, cache_cfg, cost, recorder, config.max_queue_len,
                                    step_model=cost.model, light=fast_forward, frontend=config.frontend_costs,
                                    api_server_count=config.api_server_count, frontend_gate=config.frontend_gate,
                                    router=router_node, frontend_stalls=stalls, seed=config.seed,
                                    stages=stage_pipeline(config, model, gpu, step_cost, cost),
                                    depth=config.steps_in_flight, host=host,
                                    handoff_lag=config.pp if config.pp_token_handoff else 0,
                                    token_hop_s=0.0 if step_cost is not None else gpu.link_latency_us * 1e-6,
                                    core_latency_s=config.core_latency_s)
        return SimReplica(index, sched_cfg, cache_cfg, step_cost or cost, recorder, config.max_queue_len,
                          step_model=cost.model, fast_forward=fast_forward, light=fast_forward,
                          frontend=config.frontend_costs, api_server_count=config.api_server_count,
                          noise=None if noise is None else NoiseStream(noise, config.seed, index),
                          frontend_gate=config.frontend_gate, router=router_node, frontend_stalls=stalls,
                          seed=config.seed, core_latency_s=config.core_latency_s)

    scaler = None
    if autoscale is not None:
        scaler = Autoscaler(autoscale, make_replica)
        scaler.start(min(max(config.num_replicas, autoscale.min_replicas), autoscale.max_replicas))
        replicas, serving = scaler.all_replicas, scaler.serving
    else:
        replicas = [make_replica(i) for i in range(config.num_replicas)]
        serving = replicas if failures is None else list(replicas)  # (a failed replica leaves it a while)
    policy = make_policy(config.router)
    # --max-outstanding (router_admission.py): in flight = on a replica (its `outstanding`, hung or not) or waiting
    # for the router node to send it on (`routing`)
    admission = None if config.max_outstanding is None else RouterAdmission(config.max_outstanding)
    routing = 0
    keyed = config.router == "prefix-affinity"
    pending: dict[int, int] = {}  # with failures: request -> the replica whose core it is on its way to (_ADMIT)

    def key_of(index: int):
        return prefix_key({"prompt": prompt_token_ids(index, trace[index])[:64]}) if keyed else None

    def admit(rep: SimReplica, index: int, req: SimRequest, now: float) -> bool:
        """The core of `rep` gets request `index` at now: queued (True), or refused with a 429."""
        end = rep.interrupt(now)
        if end is not None:  # its decode run is cut at now: a step ending at `end` is in flight
            version[rep.index] += 1
            heapq.heappush(steps, (end, rep.index, _STEP_END, version[rep.index]))
        if not rep.try_add(index, req, now):
            rep.outstanding -= 1  # a 429 back at the router
            if router_node is None:
                recorder.reject_latency_s.append(now - rep.core_latency_s - req.arrival_s)  # checked before the hop
            return False
        if not rep.busy:  # wake it after every arrival of this instant is queued
            rep.busy = True
            version[rep.index] += 1
            heapq.heappush(steps, (now, rep.index, _WAKE, version[rep.index]))
        return True

    def refused(index: int, req: SimRequest, at: float, tried: tuple[int, ...], key) -> bool:
        """A replica's 429 for request `index` reaches the router node at `at`: the router takes it in, then
        tries the next replica (True) or the client gets the 429 (False: the caller counts it). Without a router
        node: nothing to wait for (False: the caller tries the next one at once)."""
        if router_node is None:
            return False
        done = router_node.refused(at)
        if len(tried) < config.max_attempts and len(tried) < len(serving):
            nonlocal routing
            routing += 1
            heapq.heappush(steps, (done, _ROUTER_INDEX, _ROUTE, (index, tried, key)))
            return True
        recorder.reject_latency_s.append(done - req.arrival_s)
        recorder.num_rejected += 1
        return True

    def send(index: int, req: SimRequest, now: float, tried: tuple[int, ...], key) -> None:
        """The router sends request `index` at now to a replica it has not tried (a 429 tries the next one, up
        to max_attempts); with a front-end model the core gets it once the API process is done (_ADMIT)."""
        while len(tried) < config.max_attempts:
            candidates = [r for r in serving if r.index not in tried] if tried else list(serving)
            if not candidates:
                break
            rep = policy.choose(candidates, key)
            rep.outstanding += 1  # in flight from the router's view until it finishes or is refused
            reached = rep.intake(now, index)
            if reached is not None:  # the hop to the core (SimConfig.core_latency_s)
                reached += config.core_latency_s
            if reached is None:  # the API process's gate answered 429 (frontend.py): the router tries another
                rep.outstanding -= 1
                tried = (*tried, rep.index)
                if refused(index, req, rep.last_refusal_s, tried, key):
                    return
                recorder.reject_latency_s.append(rep.last_refusal_s - req.arrival_s)
                continue
            if reached > now:
                heapq.heappush(steps, (reached, rep.index, _ADMIT, (index, (*tried, rep.index), key)))
                if failures is not None:
                    pending[index] = rep.index
                return
            if admit(rep, index, req, now):
                return
            tried = (*tried, rep.index)
            if refused(index, req, now, tried, key):
                return
        recorder.num_rejected += 1

    # (time, replica index, kind, payload): a version for _STEP_END and _WAKE (only the latest is live),
    # (request, replicas tried, prefix key) for _ADMIT, (run serial, step) for _FINISH
    steps: list[tuple] = []
    for replica, at_s, down_s in config.replica_failures:
        heapq.heappush(steps, (at_s, replica, _KILL, down_s))
    for replica, at_s, hung_s in config.replica_hangs:
        heapq.heappush(steps, (at_s, replica, _HANG, hung_s))
    frozen: dict[int, float] = {}  # hung replica -> when it goes on: its own events wait until then
    n, i = len(trace), 0
    delay = config.frontend_latency_s
    arrivals = trace.arrival_s
    tick = arrivals[-1] / 100 if n and arrivals[-1] > 0 else math.inf
    next_tick = tick
    timeline: list[dict] = []
    now = 0.0
    next_arrival = arrivals.item(0) + delay if n else math.inf  # when request i reaches its replica
    while i < n or steps:
        t_step = steps[0][0] if steps else math.inf
        t_next = min(next_arrival, t_step)
        while t_next >= next_tick:  # every 1% of the trace: the fleet's state then, and the progress bar
            timeline.append({"t": next_tick, "waiting": sum(r.scheduler.num_waiting for r in replicas),
                             "running": sum(r.num_running for r in replicas)})
            if progress is not None:
                progress(next_tick)
            next_tick += tick
        if scaler is not None:  # polls and start-ups up to the next event
            scaler.advance_to(t_next)
        if next_arrival <= t_step:  # arrivals first at equal times
            req = trace[i]
            now = next_arrival
            key = key_of(i)
            if admission is not None and not admission.admits(sum(r.outstanding for r in replicas) + routing):
                recorder.reject_latency_s.append(now - req.arrival_s)
                recorder.num_rejected += 1
            elif router_node is None:
                send(i, req, now, (), key)
            else:  # the policy chooses once the router process has taken the request in
                routing += 1
                heapq.heappush(steps, (router_node.intake(now), _ROUTER_INDEX, _ROUTE, (i, (), key)))
            i += 1
            next_arrival = arrivals.item(i) + delay if i < n else math.inf
        else:
            now, idx, kind, ver = heapq.heappop(steps)
            if kind == _ROUTE:  # the router node sends a request on (or again, after a 429)
                j, tried, key = ver
                routing -= 1
                send(j, trace[j], now, tried, key)
                continue
            rep = replicas[idx]
            if idx in frozen and kind in (_ADMIT, _STEP_END, _WAKE, _FINISH):
                if now < frozen[idx]:  # stopped: its step's end, its intake, its wake-up are seen when it goes on
                    heapq.heappush(steps, (frozen[idx], idx, kind, ver))
                    continue
            if kind == _FINISH:
                rep.finish_mark(*ver)
                continue
            if kind == _ADMIT:  # through its API process: the core gets it now
                j, tried, key = ver
                if failures is not None:
                    if pending.get(j) != idx:
                        continue  # its replica died on the way: the kill sent it elsewhere
                    del pending[j]
                req = trace[j]
                if not admit(rep, j, req, now) and not refused(j, req, now, tried, key):
                    send(j, req, now, tried, key)
                continue
            # connections reset (a kill) or timed out (a hang past the read timeout): ejected, its requests cut or
            # sent elsewhere (failures.py)
            if kind in (_KILL, _TIMEOUT):
                if rep in serving:
                    serving.remove(rep)
                version[idx] += 1  # its step in flight never ends
                on_way = [j for j, r in pending.items() if r == idx]
                for j in on_way:
                    del pending[j]
                hang = failures.latest(idx) if kind == _TIMEOUT else None
                if hang is not None:
                    hang.setdefault("ejected_s", now)
                retry = failures.split(rep, on_way, now, hang)
                # a kill's restart, or a hung server that dropped its requests: empty, out of the router's set until
                # re-admitted (a hung one stays stopped until it goes on)
                replicas[idx] = fresh = build_replica(idx)
                _carry_counters(rep, fresh)
                if kind == _KILL:
                    heapq.heappush(steps, (now + ver, idx, _READY, now))
                for j in retry:
                    send(j, trace[j], now, (idx,), key_of(j))
                continue
            if kind == _HANG:  # alive, answering nothing: its requests wait; the probes may eject it
                frozen[idx] = resumed = now + ver
                ejected = failures.hang(idx, now, resumed)
                if ejected is not None:
                    heapq.heappush(steps, (ejected, idx, _EJECT, now))
                if ver >= failures.read_timeout_s:
                    heapq.heappush(steps, (now + failures.read_timeout_s, idx, _TIMEOUT, now))
                heapq.heappush(steps, (resumed, idx, _RESUME, now))
                continue
            if kind == _EJECT:
                if rep in serving:
                    serving.remove(rep)
                continue
            if kind == _RESUME:  # goes on where it was; re-admitted after good probes if it was ejected
                del frozen[idx]
                if "ejected_s" in failures.latest(idx):
                    heapq.heappush(steps, (failures.hang_readmit_s(idx, now), idx, _READMIT, ver))
                continue
            latest = failures.latest(idx) if kind in (_READY, _READMIT) else None
            if latest is not None and latest.get("killed_s", latest.get("hung_s")) != ver:
                continue  # (of an earlier outage: it failed again before the router took it back)
            if kind == _READY:  # answers /ready: re-admitted at its recover_threshold-th good probe
                failures.latest(idx)["ready_s"] = now
                heapq.heappush(steps, (failures.readmit_s(now), idx, _READMIT, ver))
                continue
            if kind == _READMIT:
                failures.latest(idx)["readmitted_s"] = now
                serving.append(rep)
                serving.sort(key=lambda r: r.index)
                continue
            if ver != version[idx]:
                continue  # a decode run that an arrival cut short
            end = rep.end_step(now) if kind == _STEP_END else None  # not None: a decode run goes on
            if end is None:
                end = rep.start_step(now)
            if end is not None:
                push_step_end(steps, version, idx, rep, end, _STEP_END, _FINISH)

    queries = sum(r.scheduler.block_manager.stats.queries for r in replicas)
    hits = sum(r.scheduler.block_manager.stats.hits for r in replicas)
    report = _report(config, trace, recorder, replicas, scaler, autoscale, timeline, cost, step_cost, num_blocks,
                     prefix_caching, (queries, hits), wall0, replica_model, fallback, router_node,
                     host if config.pp > 1 else None)
    if failures is not None:
        report["replica_failures"] = failures.summary()
    if admission is not None:
        report["router_admission"] = {"max_outstanding": admission.max_outstanding, "refused": admission.num_refused}
    return report



def _carry_counters(dead: SimReplica, restarted: SimReplica) -> None:
    """A restarted replica's counters go on from its dead self's (the report sums them per replica slot)."""
    restarted.steps, restarted.busy_s = dead.steps, dead.busy_s
    old, new = dead.scheduler.block_manager.stats, restarted.scheduler.block_manager.stats
    new.queries, new.hits = old.queries, old.hits
    if dead.frontend is not None:
        for name in ("busy_s", "num_gate_refusals", "stalled_s", "num_stalls"):
            setattr(restarted.frontend, name, getattr(dead.frontend, name))


def _run_disaggregated(config: SimConfig, trace: Trace, sched_cfg, cache_cfg, step_cost, cost: StepCost, noise,
                       recorder: RunRecorder, fast_forward: bool, progress, num_blocks: int, prefix_caching: bool,
                       wall0: float, replica_model: str, fallback: str | None) -> dict:
    """P prefill and D decode replicas (disaggregated.py), reported as a colocated run is, plus its section."""
    def make(cls, index: int, cache) -> SimReplica:
        return cls(index, sched_cfg, cache, step_cost or cost, recorder, config.max_queue_len,
                   step_model=cost.model, fast_forward=fast_forward, light=fast_forward,
                   frontend=config.frontend_costs, api_server_count=config.api_server_count,
                   noise=None if noise is None else NoiseStream(noise, config.seed, index),
                   frontend_gate=config.frontend_gate,
                   frontend_stalls=config.frontend_stall_table, seed=config.seed)

    replicas, timeline, section = run_disaggregated(config, trace, make, cache_cfg, recorder, progress)
    queries = sum(r.scheduler.block_manager.stats.queries for r in replicas)
    hits = sum(r.scheduler.block_manager.stats.hits for r in replicas)
    report = _report(config, trace, recorder, replicas, None, None, timeline, cost, step_cost, num_blocks,
                     prefix_caching, (queries, hits), wall0, replica_model, fallback)
    report["disaggregation"] = section
    return report


def host_costs(config: SimConfig) -> HostCosts:
    """The pipeline host's costs per step: the config's where given, else the calibration's."""
    stored = load_host_costs(config.calibration_section)
    return HostCosts(stored.step_s if config.pp_host_step_s is None else config.pp_host_step_s,
                     stored.round_trip_s if config.pp_round_trip_s is None else config.pp_round_trip_s)


def stage_pipeline(config: SimConfig, model, gpu, step_cost: Callable | list | None,
                   cost: StepCost) -> StagePipeline:
    """One replica's stages: each its StepCost over its slice of the layers (with the calibration's weights),
    the hand-off between them over NVLink when the replica fits a node; or the custom step cost(s), no hop."""
    if step_cost is not None:
        costs = list(step_cost) if isinstance(step_cost, (list, tuple)) else [step_cost] * config.pp
        if len(costs) != config.pp:
            raise ValueError(f"{len(costs)} stage costs for {config.pp} stages")
        return StagePipeline(costs, lambda _tokens: 0.0)
    stages = [StepCost(model, gpu, config.tp, cost.weights, weight_dtype=config.weights_dtype(model),
                       kv_dtype=config.kv_dtype, pp=config.pp, stage=s, tp_costs=cost.tp_costs, ep=config.layout.ep,
                       layer_partition=config.pp_layer_partition, fused_norm=config.tp_fused_norm,
                       moe_costs=cost.moe_costs, mla_costs=cost.mla_costs)
              for s in range(config.pp)]
    same_node = config.gpus_per_replica <= gpu.gpus_per_node
    return StagePipeline(stages, lambda tokens: hop_s(model, gpu, tokens, same_node))


def _report(config: SimConfig, trace: Trace, recorder: RunRecorder, replicas: list, scaler, autoscale,
            timeline: list[dict], cost: StepCost, step_cost, num_blocks: int, prefix_caching: bool,
            prefix_queries_hits: tuple[int, int], wall0: float, replica_model: str, fallback: str | None,
            router_node: RouterNode | None = None, host: HostCosts | None = None) -> dict:
    """The report of a finished run, whichever replica model ran it."""
    gpu = config.gpu_spec()
    n, arrivals, delay = len(trace), trace.arrival_s, config.frontend_latency_s
    serving = replicas if scaler is None else scaler.serving
    gpu_busy = sum(r.busy_s for r in replicas)
    queries, hits = prefix_queries_hits
    duration = max(recorder.last_completion_s, float(arrivals[-1]) if n else 0.0)
    replica_seconds = duration * len(replicas) if scaler is None else scaler.gpu_replica_seconds(duration)
    gpu_hours = None if scaler is None else replica_seconds * config.gpus_per_replica / 3600
    report = recorder.summarize(n, duration, gpu, config.num_gpus, config.goodput_ttft_s, config.goodput_tpot_s,
                                gpu_hours)
    if scaler is not None:
        report["autoscale"] = {**vars(autoscale), "max_replicas_up": max(
            (p["serving"] + p["starting"] + p["draining"] for p in scaler.timeline), default=len(serving)),
            "timeline": scaler.timeline}
    report.update({
        "model": config.model, "gpu": gpu.name, "num_gpus": config.num_gpus, "tp": config.tp, "pp": config.pp,
        # with pipeline stages: steps in flight, the host's cost per step, each stage's busy fraction and the last
        # stage's bubble as the engine measures it (pipeline.py)
        "pipeline": None if config.pp == 1 else {
            "steps_in_flight": config.steps_in_flight, "host_step_s": host.step_s,
            "round_trip_s": host.round_trip_s,
            "token_handoff": config.pp_token_handoff, "layer_partition": config.pp_layer_partition,
            "stage_busy_fraction": [sum(r.stages.busy_s[s] for r in replicas) / replica_seconds
                                    if replica_seconds else 0.0 for s in range(config.pp)],
            "bubble": sum(r.stages.bubble for r in replicas) / len(replicas)},
        "replicas": config.num_replicas, "router": config.router, "frontend_latency_s": delay, "kv_blocks_per_replica": num_blocks,
        "weight_dtype": config.weights_dtype(config.model_spec()), "kv_dtype": config.kv_dtype,
        "expert_parallel": config.layout.ep,
        "prefix_caching": prefix_caching, "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        # each replica's admission margin at the end and the p99 of its last update's prediction errors, as the
        # server exports them (meshserve:admission_margin, meshserve:admission_margin_ttft_error)
        "slo_scheduling": {"ttft_s": config.slo_ttft_s, "tpot_s": config.slo_tpot_s,
                           "admission_margin": [getattr(r, "admission", None) and r.admission.value
                                                for r in replicas],
                           "admission_error_p99": [getattr(r, "admission", None) and r.admission.last_error_quantile
                                                   for r in replicas]},
        "steps": sum(r.steps for r in replicas),
        # the API processes' CPU: requests (a 429 included) and streamed tokens; 1.0 is saturation
        "frontend": {"request_s": config.frontend_request_s, "token_s": config.frontend_token_s,
                     "refusal_s": config.frontend_refusal_s,
                     "api_server_count": config.api_server_count, "gate": config.frontend_gate,
                     "gate_refusals": sum(r.frontend.num_gate_refusals for r in replicas if r.frontend is not None),
                     "busy_fraction": sum(r.frontend.busy_s for r in replicas if r.frontend is not None)
                     / (replica_seconds * config.api_server_count) if replica_seconds else 0.0,
                     # API-process stalls (frontend_stalls.py): how many, and their share of the processes' time
                     "stalls": sum(r.frontend.num_stalls for r in replicas if r.frontend is not None),
                     "stalled_fraction": sum(r.frontend.stalled_s for r in replicas if r.frontend is not None)
                     / (replica_seconds * config.api_server_count) if replica_seconds else 0.0},
        # the router process's CPU (router_node.py): 1.0 is saturation; its deepest backlog in seconds
        "router_node": None if router_node is None else {
            "request_s": config.router_request_s, "event_s": config.router_event_s,
            "refusal_s": config.router_refusal_s, "requests": router_node.num_requests,
            "refusals": router_node.num_refusals, "events": router_node.num_events,
            "busy_fraction": router_node.busy_s / duration if duration else 0.0,
            "max_backlog_s": router_node.max_backlog_s},
        "gpu_busy_fraction": gpu_busy / replica_seconds if replica_seconds else 0.0,
        # per replica held (an autoscaled fleet's mean count, starting ones included): the KEDA rule's threshold at this load
        "in_flight_per_replica": report["in_flight_mean"] * duration / replica_seconds if replica_seconds else 0.0,
        "calibration": config.calibration_section,  # the calibration.toml fit the weights came from
        "step_weights": vars(cost.weights) if step_cost is None else "custom",
        # what a step pays at tp > 1 beyond the divided TP=1 terms (calibration.toml's tp table; unused at tp 1)
        "tp_costs": vars(cost.tp_costs) if step_cost is None else "custom",
        "step_noise": {"on": config.step_noise, "seed": config.seed, "calibration": config.calibration_section},
        # how replicas were simulated, and why not the fast model when it was asked for and did not apply
        "replica_model": replica_model, "replica_model_fallback": fallback,
        "fast_model_compiled": replica_model == "fast" and native.is_compiled(),
        "timeline": timeline,
        "sim_wall_s": time.perf_counter() - wall0,
    })
    return report
