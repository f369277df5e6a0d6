"""One simulated engine replica: the real Scheduler on a simulated clock, a step-time model for the device.

A step is scheduled at time t by the engine's own Scheduler (block manager, prefix cache, chunked prefill,
preemption, the scheduling policy with its SLO budget, admission and shedding), lasts StepCost(shape)
seconds, and at its end every sequence that sampled gets one token (a placeholder id: lengths, not text,
decide the schedule; every request runs to its output length, as W3's ignore_eos does). The front end's
admission checks (queue full, predicted TTFT past target) are applied at arrival as `meshserve serve`
applies them. Scheduling is synchronous here: with async scheduling the host work overlaps the device, so a
step's wall time is its device time, which is what the step trace measured.
"""

from __future__ import annotations

from collections.abc import Callable

from meshserve.config import CacheConfig, SchedulerConfig
from meshserve.engine.scheduler import Scheduler
from meshserve.engine.scheduler_output import SchedulerOutput
from meshserve.engine.sequence import Sequence
from meshserve.engine.step_time import StepShape
from meshserve.sampling import SamplingParams
from meshserve.simulator.metrics import RunRecorder
from meshserve.simulator.trace import SimRequest, prompt_token_ids

# The server refuses a request whose predicted TTFT exceeds this fraction of its target (async_engine.py's
# _ADMISSION_MARGIN, kept equal by tests/simulator/test_replica.py).
ADMISSION_MARGIN = 0.8
_SAMPLED_TOKEN = 1  # placeholder id for every generated token (never a stop id: ignore_eos)
_PARAMS = SamplingParams(temperature=0.0, ignore_eos=True)


class SimReplica:
    """The router sees `url` and `outstanding` (as it sees meshserve.router.replica.Replica)."""

    def __init__(self, index: int, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 step_cost: Callable[[StepShape], float], recorder: RunRecorder, max_queue_len: int = 1024,
                 step_model=None):
        self.index = index
        self.url = f"sim://replica-{index}"
        self.outstanding = 0
        self.now = 0.0
        self.scheduler = Scheduler(scheduler_config, cache_config)
        self.scheduler.clock = lambda: self.now
        # the policy predicts with the model the engine would have converged to (step time without TP comm)
        self.scheduler.policy.step_model = step_model
        self.step_cost = step_cost
        self.recorder = recorder
        self.max_queue_len = max_queue_len
        self.ttft_target_s = scheduler_config.slo_ttft_s
        self.busy = False
        self.steps = 0
        self.busy_s = 0.0
        self._in_flight: SchedulerOutput | None = None
        self._first_token_s: dict[str, float] = {}
        self._last_token_s: dict[str, float] = {}

    # -- arrivals --------------------------------------------------------------------------------
    def predicted_ttft_s(self, num_prompt_tokens: int) -> float:
        """What the server predicts at the door: the queue's wait plus this prompt's own prefill."""
        policy, chunk = self.scheduler.policy, self.scheduler.config.max_num_batched_tokens
        per_token = policy.prefill_time_s(chunk) / chunk
        return policy.queue_wait_s(list(self.scheduler.waiting), self.now) + num_prompt_tokens * per_token

    def try_add(self, index: int, req: SimRequest, now: float) -> bool:
        """Queue request `index` at time now, or refuse it (False) as the server would answer 429."""
        self.now = now
        if self.scheduler.num_waiting >= self.max_queue_len:
            return False
        if self.ttft_target_s is not None and self.scheduler.policy.step_model is not None \
                and self.predicted_ttft_s(req.prompt_len) > self.ttft_target_s * ADMISSION_MARGIN:
            return False
        rid = str(index)
        seq = Sequence(seq_id=rid, request_id=rid, index=0, prompt_token_ids=prompt_token_ids(index, req),
                       params=_PARAMS, max_tokens=req.output_len, arrival_time=now)
        self.scheduler.add(seq)
        self.outstanding += 1
        return True

    # -- steps -----------------------------------------------------------------------------------
    def start_step(self, now: float) -> float | None:
        """Schedule a step at now; returns when it ends, or None when there is nothing to run."""
        self.now = now
        out = self.scheduler.schedule()
        sched = self.scheduler
        if sched.shed:  # too late for their TTFT target: the server answers 429
            self.recorder.num_shed += len(sched.shed)
            for seq in sched.shed:
                self._forget(seq.seq_id)
            self.outstanding -= len(sched.shed)
            sched.shed.clear()
        if out.is_empty:
            self.busy = False
            return None
        context = 0
        for e in out.scheduled:
            context += e.num_computed_tokens + len(e.token_ids)
        duration = self.step_cost(StepShape(out.num_batched_tokens, len(out.scheduled), context))
        self._in_flight = out
        self.busy = True
        self.steps += 1
        self.busy_s += duration
        return now + duration

    def end_step(self, now: float) -> None:
        """The step in flight ends at now: one token for every sequence that sampled."""
        self.now = now
        out, self._in_flight = self._in_flight, None
        sampled = {e.seq_id: _SAMPLED_TOKEN for e in out.scheduled if e.do_sample}
        first, last, rec = self._first_token_s, self._last_token_s, self.recorder
        for seq in self.scheduler.update_after_step(out, sampled):
            sid = seq.seq_id
            prev = last.get(sid)
            if prev is None:
                first[sid] = now
            else:
                rec.add_itl(now - prev)
            last[sid] = now
            if seq.is_finished:
                rec.finish(seq.arrival_time, first.pop(sid), now, seq.num_output_tokens, seq.num_prompt_tokens)
                del last[sid]
                self.outstanding -= 1
        rec.num_preemptions += len(out.preempted_seq_ids)

    def _forget(self, seq_id: str) -> None:
        self._first_token_s.pop(seq_id, None)
        self._last_token_s.pop(seq_id, None)
