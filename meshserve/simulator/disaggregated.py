"""Prefill/decode disaggregation: P replicas run prompts, D replicas decode, the KV crosses a link between them.

As `meshserve router --prefill ... --decode ...` runs it (router/disagg.py): the router's policy picks a prefill
replica (least outstanding, or prefix-affine on the prompt's key; a 429 tries the next, up to max_attempts);
that replica runs the prompt as a 1-token request (chunked prefill and prefix hits by its own scheduler) and
holds its blocks when it finishes (Scheduler.kv_hold, as KVTransferCoordinator.hold). The router then sends
the decode leg to the decode replica its policy picks; that replica takes blocks for the whole prompt at once
(allocate_unregistered) and pulls the KV: prompt_len x kv_bytes_per_token bytes over the prefill replica's link,
one transfer at a time per link (a FIFO), plus a fixed latency each. The whole KV moves after the prompt's
last chunk (no layer-wise overlap: the router's default, decode leg after the prefill). Once it has landed the
prefill replica frees its blocks (the acknowledgement) and the decode replica admits the sequence as
KVTransferCoordinator._admit does: prompt computed, the producer's first token as its first output, sent to
the client then (TTFT counts the transfer). A decode replica without room for the prompt's blocks queues the
hand-off (FIFO, retried after each of its steps, its decode runs off while one waits) where the real consumer
answers 503 and the router retries colocated: the queue is the simulator's assumption.
Not modelled: the decode leg's own intake in the decode replica's API process, the colocated fallbacks.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from meshserve.engine.sequence import Sequence
from meshserve.planner.memory import kv_bytes_per_token
from meshserve.router.policy import make_policy
from meshserve.router.prefix import prefix_key
from meshserve.simulator.config import SimConfig
from meshserve.simulator.light import SimSequence
from meshserve.simulator.metrics import RunRecorder
from meshserve.simulator.replica import _PARAMS, _SAMPLED_TOKEN, SimReplica, push_step_end
from meshserve.simulator.trace import SimRequest, Trace, prompt_token_ids

_ADMIT, _STEP_END, _WAKE, _FINISH, _LANDED = -1, 0, 1, 2, 3


class PrefillReplica(SimReplica):
    """A kv_producer: its requests end at their first token, and their blocks stay held until the decode
    replica has pulled them (release)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held: dict[str, Sequence] = {}
        self.scheduler.kv_hold = self._hold
        self.prefilled: list[tuple[int, float]] = []  # (request index, when its first token left) since last read
        self.link_free_s = 0.0  # when this replica's link is done with the transfers queued on it
        self.whole: set[str] = set()  # 1-token requests: no decode leg, answered here

    def _hold(self, seq: Sequence, _status) -> bool:
        self.held[seq.seq_id] = seq
        return True

    def _finish(self, seq: Sequence, last_token_s: float) -> None:
        sid = seq.seq_id
        if sid in self.whole:
            self.whole.discard(sid)
            self.held.pop(sid)
            self.scheduler.block_manager.free(seq)
            return super()._finish(seq, last_token_s)
        self._first_token_s.pop(sid, None)
        self._last_token_s.pop(sid, None)
        self._sent_s.pop(sid, None)
        self.prefilled.append((int(sid), last_token_s))

    def release(self, seq_id: str) -> None:
        """The decode replica acknowledged the KV: its blocks go back to the pool."""
        self.scheduler.block_manager.free(self.held.pop(seq_id))


class DecodeReplica(SimReplica):
    """A kv_consumer: sequences arrive with their prompt's KV (reserve, then land) and only decode here."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fast = self.fast_forward
        self.pending: deque = deque()  # hand-offs waiting for KV room, oldest first

    def reserve(self, index: int, req: SimRequest) -> Sequence | None:
        """Blocks for the whole prompt now (a new sequence holding them), or None without room."""
        rid = str(index)
        sched = self.scheduler
        if self.light:
            seq = SimSequence.make(rid, req.prompt_len, _PARAMS, req.output_len, req.arrival_s)
            return seq if sched.block_manager.allocate(seq, req.prompt_len) else None
        seq = Sequence(seq_id=rid, request_id=rid, index=0, prompt_token_ids=prompt_token_ids(index, req),
                       params=_PARAMS, max_tokens=req.output_len, arrival_time=req.arrival_s)
        bm = sched.block_manager
        return seq if bm.allocate_unregistered(seq, bm.blocks_needed(req.prompt_len)) else None

    def land(self, seq: Sequence, now: float) -> None:
        """The KV is in at now: the sequence joins the scheduler with its prompt computed and the producer's
        first token as its first output, which the client gets now (KVTransferCoordinator._admit)."""
        self.now = now
        sid = seq.seq_id
        seq.num_computed_tokens = seq.num_cached_tokens = seq.num_prompt_tokens
        seq.first_scheduled_time = now
        seq.output_token_ids.append(_SAMPLED_TOKEN)
        if self.frontend is None:
            client = now
        else:
            if self._run is not None:  # tokens of decode steps that ended before now are ahead of it
                self._deliver_run(now)
            client = self.frontend.deliver(now, 1)
        self._first_token_s[sid] = self._last_token_s[sid] = client
        if self.frontend is not None:
            self._sent_s[sid] = seq.arrival_time
        sched = self.scheduler
        sched.seqs[sid] = seq
        sched._check_token_stop(seq, _SAMPLED_TOKEN)  # max_tokens 1: done already
        if seq.is_finished:
            sched.block_manager.free(seq)
            sched.seqs.pop(sid, None)
            self._finish(seq, client)
            self.outstanding -= 1
        else:
            sched.waiting.append(seq)

    def start_step(self, now: float) -> float | None:
        # a queued hand-off waits for blocks that finishes free: step by step, so they free on time
        self.fast_forward = self._fast and not self.pending
        return super().start_step(now)


def transfer_link(config: SimConfig, gpu) -> tuple[float, float]:
    """(bytes/s, latency s) of a KV transfer: the config's, else the catalog's GPU link (NVLink within a node)
    once per TP rank (each rank sends its heads' share over its own link)."""
    bw = config.kv_link_gb_s if config.kv_link_gb_s is not None else gpu.link_gb_s * config.tp
    lat = config.kv_transfer_latency_s if config.kv_transfer_latency_s is not None else gpu.link_latency_us * 1e-6
    return bw * 1e9, lat


def run_disaggregated(config: SimConfig, trace: Trace, make: Callable[[type, int, object], SimReplica],
                      cache_cfg, recorder: RunRecorder,
                      progress: Callable[[float], None] | None = None) -> tuple[list, list[dict], dict]:
    """Run the trace through P prefill and D decode replicas (make(cls, index, cache_config) builds one);
    returns the replicas (prefill first), the fleet's timeline and the report's disaggregation section."""
    num_p, num_d = config.disaggregation
    model, gpu = config.model_spec(), config.gpu_spec()
    bytes_per_token = kv_bytes_per_token(model, config.kv_dtype)
    bandwidth, latency = transfer_link(config, gpu)
    prefills = [make(PrefillReplica, i, cache_cfg) for i in range(num_p)]
    # the consumer's blocks stay out of the prefix cache: decode replicas count blocks (light) when they can
    decode_cache = replace(cache_cfg, enable_prefix_caching=False)
    decodes = [make(DecodeReplica, num_p + i, decode_cache) for i in range(num_d)]
    replicas: list[SimReplica] = prefills + decodes
    version = [0] * len(replicas)
    prefill_policy, decode_policy = make_policy(config.router), make_policy(config.router)
    keyed = config.router == "prefix-affinity"
    keys: dict[int, int | None] = {}
    transfer_s: list[float] = []
    handoff_wait_s: list[float] = []
    total_bytes = 0
    steps: list[tuple] = []

    def wake(rep: SimReplica, now: float) -> None:
        if not rep.busy:
            rep.busy = True
            version[rep.index] += 1
            heapq.heappush(steps, (now, rep.index, _WAKE, version[rep.index]))

    def cut_run(rep: SimReplica, now: float) -> None:
        end = rep.interrupt(now)
        if end is not None:
            version[rep.index] += 1
            heapq.heappush(steps, (end, rep.index, _STEP_END, version[rep.index]))

    def admit(rep: PrefillReplica, index: int, req: SimRequest, now: float) -> bool:
        # the prefill leg: max_tokens 1 (router/disagg.prefill_body)
        if req.output_len == 1:  # the prefill is the whole request (router/disagg.wants_disaggregation)
            rep.whole.add(str(index))
        if not rep.try_add(index, replace(req, output_len=1), now):
            rep.outstanding -= 1
            recorder.reject_latency_s.append(now - req.arrival_s)
            return False
        wake(rep, now)
        return True

    def send(index: int, req: SimRequest, now: float, tried: tuple[int, ...], key) -> None:
        while len(tried) < min(config.max_attempts, num_p):
            candidates = [r for r in prefills if r.index not in tried]
            rep = prefill_policy.choose(candidates, key)
            rep.outstanding += 1
            reached = rep.intake(now, index)
            tried = (*tried, rep.index)
            if reached is None:  # the API process's gate answered 429
                rep.outstanding -= 1
                recorder.reject_latency_s.append(rep.last_refusal_s - req.arrival_s)
                continue
            if reached > now:
                heapq.heappush(steps, (reached, rep.index, _ADMIT, (index, tried, key)))
                return
            if admit(rep, index, req, now):
                return
        recorder.num_rejected += 1

    def start_transfer(src: PrefillReplica, dst: DecodeReplica, seq: Sequence, ready_s: float, now: float) -> None:
        nonlocal total_bytes
        size = seq.num_prompt_tokens * bytes_per_token
        start = max(now, src.link_free_s)
        src.link_free_s = start + size / bandwidth
        landed = src.link_free_s + latency
        total_bytes += size
        transfer_s.append(landed - start)
        handoff_wait_s.append(start - ready_s)
        heapq.heappush(steps, (landed, dst.index, _LANDED, (src.index, seq)))

    def hand_off(src: PrefillReplica, index: int, ready_s: float) -> None:
        """The prefill of request `index` is done and its answer back at the router at ready_s: the decode leg
        (the router's clock: the decode replica's blocks are taken and the pull starts then)."""
        dst = decode_policy.choose(decodes, keys.pop(index, None))
        dst.outstanding += 1
        seq = None if dst.pending else dst.reserve(index, trace[index])
        if seq is None:
            dst.pending.append((src, index, ready_s))
            cut_run(dst, ready_s)  # its blocks must free step by step from now on
        else:
            start_transfer(src, dst, seq, ready_s, ready_s)

    def retry_pending(dst: DecodeReplica, now: float) -> None:
        while dst.pending:
            src, index, ready_s = dst.pending[0]
            seq = dst.reserve(index, trace[index])
            if seq is None:
                return
            dst.pending.popleft()
            start_transfer(src, dst, seq, ready_s, now)

    n, i = len(trace), 0
    arrivals = trace.arrival_s
    delay = config.frontend_latency_s
    tick = arrivals[-1] / 100 if n and arrivals[-1] > 0 else math.inf
    next_tick = tick
    timeline: list[dict] = []
    next_arrival = arrivals.item(0) + delay if n else math.inf
    while i < n or steps:
        t_step = steps[0][0] if steps else math.inf
        t_next = min(next_arrival, t_step)
        while t_next >= next_tick:
            timeline.append({"t": next_tick, "waiting": sum(r.scheduler.num_waiting for r in replicas),
                             "running": sum(r.num_running for r in replicas)})
            if progress is not None:
                progress(next_tick)
            next_tick += tick
        if next_arrival <= t_step:
            req = trace[i]
            key = prefix_key({"prompt": prompt_token_ids(i, req)[:64]}) if keyed else None
            keys[i] = key
            send(i, req, next_arrival, (), key)
            i += 1
            next_arrival = arrivals.item(i) + delay if i < n else math.inf
            continue
        now, idx, kind, payload = heapq.heappop(steps)
        rep = replicas[idx]
        if kind == _ADMIT:
            j, tried, key = payload
            if not admit(rep, j, trace[j], now):
                send(j, trace[j], now, tried, key)
            continue
        if kind == _FINISH:
            rep.finish_mark(*payload)
            continue
        if kind == _LANDED:
            src_index, seq = payload
            src = replicas[src_index]
            src.release(seq.seq_id)  # acknowledged: the producer's blocks come free
            if src.scheduler.num_waiting:
                wake(src, now)
            cut_run(rep, now)
            rep.land(seq, now)
            wake(rep, now)
            continue
        if payload != version[idx]:
            continue
        end = rep.end_step(now) if kind == _STEP_END else None
        if isinstance(rep, PrefillReplica) and rep.prefilled:
            for j, ready_s in rep.prefilled:
                hand_off(rep, j, ready_s)
            rep.prefilled.clear()
        elif isinstance(rep, DecodeReplica) and rep.pending:
            retry_pending(rep, now)
        if end is None:
            end = rep.start_step(now)
        if end is not None:
            push_step_end(steps, version, idx, rep, end, _STEP_END, _FINISH)

    duration = max(recorder.last_completion_s, float(arrivals[-1]) if n else 0.0)
    ts = np.asarray(transfer_s) if transfer_s else np.zeros(1)
    waits = np.asarray(handoff_wait_s) if handoff_wait_s else np.zeros(1)
    section = {
        "prefill_replicas": num_p, "decode_replicas": num_d, "layerwise": False,
        "kv_link_gb_s": bandwidth / 1e9, "transfer_latency_s": latency, "kv_bytes_per_token": bytes_per_token,
        "transfers": len(transfer_s), "transfer_bytes": total_bytes,
        "transfer_s": {"mean": float(ts.mean()), "p50": float(np.percentile(ts, 50)),
                       "p99": float(np.percentile(ts, 99))},
        # from the prefill's first token to its transfer's start: waiting for decode KV room or the link
        "handoff_wait_s": {"mean": float(waits.mean()), "p99": float(np.percentile(waits, 99))},
        "prefill_busy_fraction": sum(r.busy_s for r in prefills) / (duration * num_p) if duration else 0.0,
        "decode_busy_fraction": sum(r.busy_s for r in decodes) / (duration * num_d) if duration else 0.0,
    }
    return replicas, timeline, section
