"""One simulated engine replica: the real Scheduler on a simulated clock, a step-time model for the device.

A step is scheduled at time t by the engine's own Scheduler (block manager, prefix cache, chunked prefill,
preemption, the scheduling policy with its SLO budget, admission and shedding), lasts StepCost(shape)
seconds, and at its end every sequence that sampled gets one token (a placeholder id: lengths, not text,
decide the schedule; every request runs to its output length, as W3's ignore_eos does). The server's
admission checks (queue full, predicted TTFT past target) are applied when the core gets the request, as
`meshserve serve` applies them; with a front-end model (frontend.py) that is after the API process's queue,
and tokens reach the client after it too. With a TTFT target and a front-end model the API process's gate runs
first, at the request's arrival, as the server's middleware does (frontend.py): its delays plus the core's
predicted queue wait past the target answer 429 before the request costs an intake. The TTFT the admission
predicts counts from the request's arrival at its API process (the server stamps it at the first ASGI call, when
the process gets to it) and includes that process's loop lag (AsyncLLM.predicted_ttft_s). The queue wait both
checks use is the core's as of its last step (the counters published with each step's outputs), blind to the
requests every API process sent since, as the server's is: with 4 API processes that alone closes the admission
margin from ~0.9 to the server's 0.82-0.86. Scheduling is synchronous here: with async scheduling the host work
overlaps the device, so a step's wall time is its device time, which is what the step trace measured.

Speed (an hour of 1,000 req/s is 3.6 M requests): without prefix caching sequences are counts (light.py); and
when nobody waits and every running sequence decodes, the scheduler's next decisions are fixed, so a decode
run lays those steps out without calling it (_start_run), across finishes, until an arrival cuts it (interrupt)
or it ends; its bookkeeping is applied in one go (_end_run). With fast_forward off every step goes through the
scheduler with the engine's own Sequence and BlockManager: the reference the fast path is tested against.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from meshserve.config import CacheConfig, SchedulerConfig
from meshserve.engine.admission_margin import AdmissionMargin
from meshserve.engine.scheduler import Scheduler
from meshserve.engine.scheduler_output import SchedulerOutput
from meshserve.engine.sequence import Sequence
from meshserve.engine.step_time import StepShape
from meshserve.errors import PromptTooLongError
from meshserve.sampling import SamplingParams
from meshserve.simulator.frontend import FrontEnd, FrontEndCosts
from meshserve.simulator.frontend_stalls import FrontEndStalls
from meshserve.simulator.light import LightScheduler, SimSequence
from meshserve.simulator.metrics import RunRecorder
from meshserve.simulator.router_node import RouterNode
from meshserve.simulator.step_noise import NoiseStream
from meshserve.simulator.trace import SimRequest, prompt_token_ids

_SAMPLED_TOKEN = 1  # placeholder id for every generated token (never a stop id: ignore_eos)
_PARAMS = SamplingParams(temperature=0.0, ignore_eos=True)
_FIRST_LAYOUT = 16  # decode steps a run lays out at first (then doubling)


class SimReplica:
    """The router sees `url` and `outstanding` (as it sees meshserve.router.replica.Replica): the router counts a
    request from when it sends it (fleet.py) until it finishes, is shed, or is refused."""

    def __init__(self, index: int, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 step_cost: Callable[[StepShape], float], recorder: RunRecorder, max_queue_len: int = 1024,
                 step_model=None, fast_forward: bool = True, light: bool = True,
                 frontend: FrontEndCosts | None = None, api_server_count: int = 1,
                 noise: NoiseStream | None = None, frontend_gate: bool = True, router: RouterNode | None = None,
                 frontend_stalls: FrontEndStalls | None = None, seed: int = 0, core_latency_s: float = 0.0):
        self.index = index
        self.url = f"sim://replica-{index}"
        self.outstanding = 0
        self.now = 0.0
        # light: sequences as counts and a counting block manager (light.py), when no prefix cache needs ids
        self.light = light and not cache_config.enable_prefix_caching
        self.scheduler = (LightScheduler if self.light else Scheduler)(scheduler_config, cache_config)
        self.scheduler.clock = lambda: self.now
        # the policy predicts with the model the engine would have converged to (step time without TP comm)
        self.scheduler.policy.step_model = step_model
        self.step_cost = step_cost
        # host time before a step that the engine's step model does not see (StepCost.host_s: eager mixed steps,
        # eager_steps.py); a custom step cost has none
        self.host_cost = getattr(step_cost, "host_s", None)
        # step-time noise and host gaps drawn by step index (step_noise.py); None: every step as predicted
        self.noise = noise
        self.recorder = recorder
        self.max_queue_len = max_queue_len
        self.ttft_target_s = scheduler_config.slo_ttft_s
        self.busy = False
        self.steps = 0
        self.busy_s = 0.0
        self._in_flight: SchedulerOutput | None = None
        self.fast_forward = fast_forward
        self._run: DecodeRun | None = None
        self._serial = 0  # decode runs started
        # (time, run serial, step) of finishes inside decode runs, for the event loop to deliver (finish_mark)
        self.finish_marks: list[tuple[float, int, int]] = []
        # token times below are the client's: when the API process has streamed them (the core's without it)
        self._first_token_s: dict[str, float] = {}
        self._last_token_s: dict[str, float] = {}
        # the API process (frontend.py), and when each request was sent (its TTFT counts from then; the
        # core's clock starts at its handler, after the API process's queue)
        self.gate = frontend_gate and self.ttft_target_s is not None
        # API-process stalls (frontend_stalls.py): of builds with the gate before 054ccb3, so drawn only with it
        self.frontend = (FrontEnd(frontend, api_server_count, gate=self.gate,
                                  stalls=frontend_stalls if self.gate else None, seed=seed, replica=index,
                                  fold=self.gate)
                         if frontend is not None and frontend.enabled else None)
        self._sent_s: dict[str, float] = {}
        # with the gate and several API processes, each stream's tokens leave through the process that took its
        # request (a stall holds that process's streams only): seq id -> process; step by step (no decode runs)
        self.per_process = self.frontend is not None and self.gate and api_server_count > 1 and router is None
        self._process_of: dict[str, int] = {}
        # the router process the fleet shares (router_node.py): what the API process streams reaches the client
        # through it (the server's own clock, its admission margin's included, stops at the API process)
        self.router = router
        # per request in an API process: (when it arrived there, which process took it)
        self._at_api: dict[int, tuple[float, int]] = {}
        self.last_refusal_s = 0.0  # when the gate's last 429 left
        # the server's admission margin, fed as the API process feeds it (AsyncLLM): each admitted request's
        # predicted TTFT and when its clock started, until its first token is out
        self.admission = AdmissionMargin()
        self._predicted: dict[str, tuple[float, float]] = {}
        # the core's predicted queue wait as of its last step: what the API processes predict from (the server's
        # SchedulerStats come with each step's outputs), blind to the requests sent since
        self._published_wait_s = 0.0
        # the fleet hands the core each request this long after the API process's intake (SimConfig.core_latency_s);
        # the server checks its TTFT before that hop, so the check's clock is read that much earlier
        self.core_latency_s = core_latency_s

    # -- arrivals --------------------------------------------------------------------------------
    def intake(self, t: float, index: int = -1) -> float | None:
        """Request `index` reaches this replica's API process at t: when its intake is done and the core gets
        it (t itself without a front-end model), or None when the gate answers 429 (frontend.py)."""
        if self.frontend is None:
            return t
        if self._run is not None:  # tokens of decode steps that ended before t are ahead of it in the queue
            self._deliver_run(t)
        fe = self.frontend
        i = fe.choose(t)
        if self.gate and self.scheduler.policy.step_model is not None:
            # the middleware's check (ServingEngine.frontend_admission_error), when the process gets to the
            # request (after the work ahead of it, a stall's included): input delay + the core's predicted TTFT of
            # a prompt of 0 tokens (its last published queue wait and this process's loop lag)
            input_delay, loop_lag = fe.delay_s(i, t)
            self.now = max(self.now, t)
            predicted = input_delay + loop_lag + self._published_wait_s
            if not self.admission.admits(predicted, self.ttft_target_s):
                self.last_refusal_s = fe.refuse(t, i)  # when the client gets the 429
                return None
        self._at_api[index] = (fe.reached(i, t), i)  # the server's clock starts there (its ARRIVAL stamp)
        return fe.intake(t, i)

    def predicted_ttft_s(self, req: SimRequest, since: float, loop_lag_s: float = 0.0) -> float:
        """What the server predicts at the door (AsyncLLM.predicted_ttft_s): the time since `since` (when
        the server's clock started on it), the queue's wait, this prompt's own prefill, and the API process's
        loop lag (its tokens leave that late)."""
        policy, chunk = self.scheduler.policy, self.scheduler.config.max_num_batched_tokens
        per_token = policy.prefill_time_s(chunk) / chunk
        waited = self.now - since
        return (waited + self._published_wait_s + req.prompt_len * per_token
                + loop_lag_s)

    def try_add(self, index: int, req: SimRequest, now: float) -> bool:
        """Queue request `index` at time now (it was sent at req.arrival_s), or refuse it (False) as the server
        would answer 429. The server's clock starts at the request's handler: when it was sent without a
        front-end model (the fixed front-end latency counted), else when the API process took it up."""
        self.now = now
        loop_lag = 0.0
        if self.frontend is None:
            since = req.arrival_s
        elif self.gate:  # the server's clock starts at its arrival in the API process (frontend.py)
            since, i = self._at_api.pop(index, (now - self.core_latency_s - self.frontend.costs.per_request_s, 0))
            loop_lag = self.frontend.delay_s(i, now)[1]
        else:  # the server before the gate: its clock started at the handler, after the API process's queue
            since = now - self.core_latency_s - self.frontend.costs.per_request_s
        if self.scheduler.num_waiting >= self.max_queue_len:
            return False
        predicted = None
        if self.ttft_target_s is not None and self.scheduler.policy.step_model is not None:
            predicted = self.predicted_ttft_s(req, since + self.core_latency_s, loop_lag)
            if not self.admission.admits(predicted, self.ttft_target_s):
                return False
        rid = str(index)
        if self.light:
            seq = SimSequence.make(rid, req.prompt_len, _PARAMS, req.output_len, since)
        else:
            seq = Sequence(seq_id=rid, request_id=rid, index=0, prompt_token_ids=prompt_token_ids(index, req),
                           params=_PARAMS, max_tokens=req.output_len, arrival_time=since)
        try:
            self.scheduler.add(seq)
        except PromptTooLongError:  # the server answers 400: longer than max_model_len or the whole KV pool
            return False
        if self.frontend is not None:
            self._sent_s[rid] = req.arrival_s
        if self.per_process:
            self._process_of[rid] = i
        if predicted is not None:
            self._predicted[rid] = (predicted, since)
        return True

    def has_first_token(self, seq_id: str, now: float | None = None) -> bool:
        """Whether sequence seq_id's first token has reached the client (by now, when given)."""
        t = self._first_token_s.get(seq_id)
        return t is not None and (now is None or t <= now)

    def _finish(self, seq: Sequence, last_token_s: float) -> None:
        """Record a finished request (its times the client's) and stop counting it."""
        sid = seq.seq_id
        sent = seq.arrival_time if self.frontend is None else self._sent_s.pop(sid)
        self.recorder.finish(sent, self._first_token_s.pop(sid), last_token_s, seq.num_output_tokens,
                             seq.num_prompt_tokens)
        del self._last_token_s[sid]

    # -- steps -----------------------------------------------------------------------------------
    def start_step(self, now: float) -> float | None:
        """Schedule a step at now; returns when it ends (or when the first steps of a decode run end), or None
        when there is nothing to run."""
        self.now = now
        sched = self.scheduler
        if (self.fast_forward and not self.per_process and not sched.waiting and sched.running
                and self._start_run(now)):
            self._published_wait_s = 0.0  # nobody waits
            return self._run.end_times[-1]
        queued = sched.num_waiting  # requests waiting when the step is decided: the host gap's table
        out = self._schedule()
        if out is None:
            self.busy = False
            return None
        shape = self._shape(out)
        duration = device = self.step_cost(shape)
        if self.noise is not None:
            duration, device = self.noise.apply(self.steps, device, out.num_batched_tokens > len(out.scheduled),
                                                queued)
        if self.host_cost is not None:
            duration += self.host_cost(shape)
        self._in_flight = out
        self.busy = True
        self.steps += 1
        self.busy_s += device
        return now + duration

    def _publish(self) -> None:
        """The core's counters as the API processes get them with a step's outputs: its queue's predicted wait
        once the next step is decided (SchedulingPolicy.queue_wait_s, as EngineCore.scheduler_stats)."""
        if self.ttft_target_s is not None and self.scheduler.policy.step_model is not None:
            self._published_wait_s = self.scheduler.policy.queue_wait_s(list(self.scheduler.waiting), self.now)

    def _schedule(self) -> SchedulerOutput | None:
        """The scheduler's next step at self.now (None: nothing to run); requests it shed are answered 429."""
        sched = self.scheduler
        out = sched.schedule()
        self._publish()
        if sched.shed:  # too late for their TTFT target: the server answers 429
            self.recorder.num_shed += len(sched.shed)
            for seq in sched.shed:
                self._forget(seq.seq_id)
            self.outstanding -= len(sched.shed)
            sched.shed.clear()
        return None if out.is_empty else out

    @staticmethod
    def _shape(out: SchedulerOutput) -> StepShape:
        context = 0
        for e in out.scheduled:
            context += e.num_computed_tokens + e.num_new_tokens
        return StepShape(out.num_batched_tokens, len(out.scheduled), context)

    def end_step(self, now: float) -> float | None:
        """The step (or decode run) in flight ends at now: one token for every sequence that sampled. A decode
        run whose laid-out steps end at now but that goes on lays out more, and returns their end."""
        self.now = now
        run = self._run
        if run is not None:
            laid = len(run.end_times)
            if laid < run.total:
                self._lay_out(min(run.total, 2 * laid))
                return run.end_times[-1]
            self._end_run(laid)
            return None
        out, self._in_flight = self._in_flight, None
        self._apply_step(out, now)
        return None

    def _apply_step(self, out: SchedulerOutput, now: float) -> None:
        """Step `out`'s results are back at now: its tokens (the client's times), finishes, preemptions."""
        sampled = {e.seq_id: _SAMPLED_TOKEN for e in out.scheduled if e.do_sample}
        first, last, rec = self._first_token_s, self._last_token_s, self.recorder
        folds = self.frontend is not None and self.frontend.fold
        by_process = None
        if self.per_process and sampled:  # each process writes its own streams' tokens
            process_of, counts = self._process_of, [0] * self.frontend.processes
            for sid in sampled:
                counts[process_of.get(sid, 0)] += 1
            by_process = self.frontend.deliver_counts(now, counts)
            seen = client = now
        else:
            seen = now if self.frontend is None or not sampled else self.frontend.deliver(now, len(sampled))
            client = seen if self.router is None or not sampled else self.router.relay(seen, len(sampled))
        for seq in self.scheduler.update_after_step(out, sampled):
            sid = seq.seq_id
            if by_process is not None:
                seen = client = by_process[self._process_of.get(sid, 0)]
            prev = last.get(sid)
            if prev is None:
                first[sid] = client
                if sid in self._predicted:
                    predicted, since = self._predicted.pop(sid)
                    self.admission.observe(predicted, seen - since, self.ttft_target_s)
            elif client > prev or not folds:  # a folded token rides its stream's last event: no gap at the client
                rec.add_itl(client - prev)
            last[sid] = client
            if seq.is_finished:
                self._finish(seq, client)
                self.outstanding -= 1
                self._process_of.pop(sid, None)
        rec.num_preemptions += len(out.preempted_seq_ids)

    def _forget(self, seq_id: str) -> None:
        self._first_token_s.pop(seq_id, None)
        self._last_token_s.pop(seq_id, None)
        self._sent_s.pop(seq_id, None)
        self._predicted.pop(seq_id, None)
        self._process_of.pop(seq_id, None)

    # -- decode runs: many decode steps at once -------------------------------------------------
    def _start_run(self, now: float) -> bool:
        """With nobody waiting and every running sequence decoding, the scheduler's next steps decode the
        same batch, less the sequences that finish, until a request arrives: with every block the run needs
        free (checked here), nothing else changes its decisions (every decode fits the token budget, the SLO
        policy's included; nobody to admit, shed or preempt). Lay out those steps (their durations follow
        the batch and its KV reads) without calling the scheduler or doing per-step bookkeeping; an arrival
        cuts the run short (interrupt). False when the next step is not one of those (or the run would be a
        single step)."""
        sched = self.scheduler
        seqs = sched.running
        n = len(seqs)
        last, max_len = self._last_token_s, sched.config.max_model_len
        bm = sched.block_manager
        bs, block_table = bm.block_size, bm.block_table
        finish = []  # per sequence: the run's step whose token ends it (max_tokens or max_model_len)
        ending: dict[int, list[int]] = {}  # finish step -> [sequences, their KV tokens before the run]
        need = base = 0  # blocks the run takes; KV tokens before it
        for seq in seqs:
            tokens, computed = seq.num_tokens, seq.num_computed_tokens
            if tokens - computed != 1 or seq.seq_id not in last:
                return False  # not a decode (or a one-token prompt, whose first token is due)
            r = seq.max_tokens - seq.num_output_tokens
            r = min(r, max_len - tokens)
            finish.append(r)
            # every token of the run must fit without preempting (blocks of sequences finishing mid-run
            # return later than step by step would return them: a stricter test)
            need += -(-(computed + r) // bs) - len(block_table(seq))
            base += computed
            e = ending.get(r)
            if e is None:
                ending[r] = [1, computed]
            else:
                e[0] += 1
                e[1] += computed
        steps = max(ending)
        if steps < 2 or need > bm.num_free_blocks:
            return False
        # segments between finishes: steps (first, last] of `size` sequences, step j reading base + size * j
        size, first, segments = n, 0, []
        for r in sorted(ending):
            segments.append((first, r, size, base))
            count, context = ending[r]
            size, base, first = size - count, base - context, r
        self._serial += 1
        durations: list[float] = []
        self._run = DecodeRun(self._serial, now, steps, list(seqs), finish, [], durations, segments,
                              {r: e[0] for r, e in ending.items()},
                              device_s=durations if self.noise is None else [])
        self._lay_out(min(steps, _FIRST_LAYOUT))
        sched.policy.charge(StepShape(n, n, segments[0][3] + n), seqs)  # the first step, as schedule() would
        self.busy = True
        return True

    def _lay_out(self, upto: int) -> None:
        """Lay out the run's steps up to step `upto` (arrivals usually cut a run within tens of steps: its
        steps are laid out in doubling chunks, each chunk's end an event that extends it, see end_step)."""
        run = self._run
        have = len(run.durations)
        t = run.end_times[-1] if have else run.start_s
        for first, last, size, base in run.segments:
            if last <= have:
                continue
            if first >= upto:
                break
            a = max(first, have)
            durations = decode_durations(self.step_cost, size, base + size * a, min(last, upto) - a)
            if self.noise is not None:  # run step j is the replica's step self.steps + j - 1; nobody waits
                durations, devices = self.noise.apply_decode(self.steps + a, durations)
                run.device_s += devices
            run.durations += durations
            for d in durations:
                t += d  # accumulated as step-by-step would, so both give the same floats
                run.end_times.append(t)
        # sequences finishing before the run's end leave the router's count on time (finish_mark)
        self.finish_marks += [(run.end_times[r - 1], run.serial, r) for r in run.num_finishing
                              if have < r <= upto and r < run.total]

    def finish_mark(self, serial: int, step: int) -> None:
        """Step `step` of run `serial` ended and some of its sequences finished: the router stops counting
        them now, as it would step by step (the rest of their bookkeeping waits for the run's end)."""
        run = self._run
        if run is None or run.serial != serial or step >= len(run.end_times):
            return  # the run was cut before that step, or it is the run's last step (its end handles it)
        k = run.num_finishing[step]
        self.outstanding -= k
        run.num_counted += k

    @property
    def num_running(self) -> int:
        """Running sequences now (those that finished inside the decode run in flight are gone)."""
        return self.scheduler.num_running - (self._run.num_counted if self._run is not None else 0)

    def interrupt(self, now: float) -> float | None:
        """A request arrives at now during a decode run: the steps that end before now happen as laid out,
        and so does the one running at now (the scheduler decided it before the arrival); the run is cut
        after it, so the next step sees the arrival exactly as a step-by-step run would. Returns the run's
        new end, or None when no run is in flight or its end is unchanged."""
        run = self._run
        if run is None:
            return None
        keep = bisect.bisect_left(run.end_times, now) + 1  # steps that ended before now, and the one at now
        run.total = min(run.total, keep)
        if keep >= len(run.end_times):
            return None  # ends with the steps laid out: their end is already an event
        del run.end_times[keep:], run.durations[keep:]
        if run.device_s is not run.durations:
            del run.device_s[keep:]
        return run.end_times[-1]

    def _deliver_run(self, until: float | None = None) -> None:
        """Hand the front end the tokens of the run's steps that ended before `until` (all laid out: None), in
        order; each step's client time goes to run.seen."""
        run = self._run
        k, end_times = len(run.seen), run.end_times
        stop = len(end_times) if until is None else bisect.bisect_left(end_times, until)
        for first, last, size, _ in run.segments:
            if k >= stop:
                break
            if k < last:
                seen = self.frontend.deliver_all(end_times[k:min(last, stop)], size)
                run.seen += seen
                if self.router is not None:
                    run.client += [self.router.relay(t, size) for t in seen]
                k = min(last, stop)

    def _end_run(self, done: int) -> None:
        """Apply the first `done` (>= 1) steps of the run: tokens, blocks, SLO credit, inter-token gaps,
        finishes (in the order step by step would finish them: it decides which freed blocks go first)."""
        if self.frontend is not None:
            self._deliver_run()
        run, self._run = self._run, None
        sched, rec = self.scheduler, self.recorder
        folds = self.frontend is not None and self.frontend.fold  # folded tokens: no gap at the client
        # the client's time of each step's tokens
        seen = run.end_times if self.frontend is None else run.seen if self.router is None else run.client
        self.now = run.end_times[done - 1]
        policy = sched.policy
        charge = policy.tpot_target(run.seqs) is not None
        for first, last, size, base in run.segments:
            if first >= done:
                break
            # gaps as the step-by-step run takes them, from one step's time to the next (the first step's
            # below: from each sequence's own last token)
            gaps = [seen[j] - seen[j - 1] for j in range(max(first, 1), min(last, done))]
            rec.add_itl_counts([g for g in gaps if g > 0] if folds else gaps, size)
            if charge:
                for j in range(max(first, 1), min(last, done)):  # step j + 1: the first was charged at its start
                    policy.charge(StepShape(size, size, base + size * (j + 1)),
                                  [s for s, r in zip(run.seqs, run.finish) if r > j])
        self.steps += done
        self.busy_s += sum(run.device_s[:done])
        light, last_token, first_seen = self.light, self._last_token_s, seen[0]
        ended = []
        for seq, r in zip(run.seqs, run.finish):
            k = min(r, done)
            if light:
                seq.output_token_ids.n += k  # a TokenCount
            else:
                seq.output_token_ids.extend([_SAMPLED_TOKEN] * k)
            # blocks for every token computed in the run (reserved when it started)
            allocated = sched.block_manager.allocate(seq, k)
            assert allocated, "a decode run reserved its blocks when it started"
            seq.num_computed_tokens += k
            sid = seq.seq_id
            if first_seen > last_token[sid] or not folds:
                rec.add_itl(first_seen - last_token[sid])
            last_token[sid] = seen[k - 1]
            if r <= done:
                ended.append((r, seq))
        ended.sort(key=lambda e: e[0])  # stable: batch order within a step
        for r, seq in ended:
            sched._check_token_stop(seq, _SAMPLED_TOKEN)  # max_tokens or max_model_len: the scheduler's rule
            assert seq.is_finished, "a decode run ends a sequence where the scheduler would"
            self._finish(seq, seen[r - 1])
        self.outstanding -= len(ended) - run.num_counted


def decode_durations(step_cost: Callable[[StepShape], float], n: int, context: int, steps: int) -> list[float]:
    """Durations of `steps` decode steps of n sequences holding `context` KV tokens before the first: step j
    reads context + n * j. StepCost computes them in one go (StepCost.decode_durations, the same floats)."""
    bulk = getattr(step_cost, "decode_durations", None)
    if bulk is not None:
        return bulk(n, context, steps)
    return [step_cost(StepShape(n, n, context + n * j)) for j in range(1, steps + 1)]


@dataclass
class DecodeRun:
    """Decode steps laid out ahead (so far): step j (1-based) ends at end_times[j - 1] after durations[j - 1];
    seqs[i] ends with the token of step finish[i]; segments (first, last, size, base): steps first + 1 ..
    last decode `size` sequences reading base + size * j KV tokens at step j; num_finishing: sequences ending
    at a step; num_counted: those the router already stopped counting (finish_mark)."""

    serial: int
    start_s: float
    total: int  # steps the run lasts unless an arrival cuts it
    seqs: list[Sequence]
    finish: list[int]
    end_times: list[float]
    durations: list[float]
    segments: list[tuple[int, int, int, int]]
    num_finishing: dict[int, int]
    num_counted: int = 0
    seen: list[float] = field(default_factory=list)  # API process's times of the steps delivered so far (front end)
    client: list[float] = field(default_factory=list)  # the same through the router node (router_node.py)
    # device time of each step laid out: durations itself without noise, durations less the host gaps with it
    device_s: list[float] = field(default_factory=list)


def push_step_end(steps: list, version: list[int], idx: int, rep, end: float, step_end: int, finish: int) -> None:
    """Put replica idx's step ending at `end` on the event heap (a new version: older events of the replica are
    stale), with the finish times its decode run marked (rep.finish_marks, taken here)."""
    version[idx] += 1
    heapq.heappush(steps, (end, idx, step_end, version[idx]))
    if rep.finish_marks:
        for t, serial, step in rep.finish_marks:
            heapq.heappush(steps, (t, idx, finish, (serial, step)))
        rep.finish_marks.clear()
