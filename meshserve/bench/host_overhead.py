"""`meshserve bench host`: the engine's host-side time per step at a given batch, with the model removed.

Scheduling, batch preparation (the runner's real `_prepare` and `launch`), token bookkeeping, stop checks,
speculative-decoding bookkeeping, the counters and the front end's output processing all run as in a real
step; only the forward pass and the sampler are replaced by an instant fake that "samples" one fixed token
(remove_model below), so the figure is what every GPU step pays on the CPU, to compare with the GPU step
time. By default it is measured with async scheduling off (the same work; with it on, the work overlaps the
GPU's next step instead of adding). Flags turn on the features that add per-step work: async scheduling,
service-level targets, the KV offload CPU tier, n-gram speculation.

By default the whole batch is admitted first and then decodes (decode-only steps). --waiting N measures a
serving steady state instead (W3 past the knee): a queue of N requests of --prompt-len tokens, topped up
before every step, in front of a running batch of up to --batch requests of --max-tokens output tokens each,
so requests finish in every step and new ones are admitted under the policy (with targets: the prefill cap
--slo-prefill-chunk), each step a mixed one of decodes and prompt chunks. Its clock is simulated (a fixed
step period, STEADY_STEP_S), so the queue's waits, and so the requests shed as too late for their TTFT
target, do not depend on this machine's speed (or a profiler's).

Times are this thread's CPU time (time.thread_time: on a shared machine, wall time also counts the waits
for a core), medians over the measured steps, with the median step's wall time beside them. Each step is
split into components, timed around the engine's own methods: schedule (EngineCore._schedule),
prepare (the runner's flat batch), launch (the rest of the runner's launch: the fake sampler, offload copies),
process (EngineCore._process: token bookkeeping, stops, proposals, deltas), stats (the SchedulerStats
published every step), frontend (the offline front end's output processing) and other (the rest of the step).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections import defaultdict

from meshserve.bench.report import print_table
from meshserve.cli_types import non_negative_float, non_negative_int, positive_int
from meshserve.engine.heap import freeze_startup_heap

COMPONENTS = ("schedule", "prepare", "launch", "process", "stats", "frontend")
# --waiting mode's simulated step period: W3 on Qwen3-0.6B at saturation ran a step every ~10 ms on an H200
# (median gap between steps, benchmarks/results/h200_1202_s21/w3_default/steps.jsonl.gz)
STEADY_STEP_S = 0.010


def remove_model(runner, token_id: int = 17) -> None:
    """Replace the runner's forward and sampler with an instant fake: every sampling row gets token_id, and a
    verify row accepts its leading proposals equal to token_id (what a model that always says token_id
    would accept), then adds its own token_id. Everything around them (launch, _prepare, the async
    hand-over of sampled ids to the next step, the verify rows' read-back) is the runner's real code."""
    sampling = runner.sampling

    import torch  # here, not at the top: the CLI imports this module's parser before it validates arguments

    def fake_sample(scheduled, hidden, meta, parity, grammar_bitmask=None):
        from meshserve.engine.runner_output import ModelRunnerOutput

        rows = [s for s in scheduled if s.do_sample and not s.num_spec_tokens]
        verify = [s for s in scheduled if s.do_sample and s.num_spec_tokens]
        spec = None
        if verify:
            k = max(s.num_spec_tokens for s in verify)
            packed = []
            for s in verify:
                drafts = s.token_ids[len(s.token_ids) - s.num_spec_tokens:]
                accepted = next((i for i, t in enumerate(drafts) if t != token_id), len(drafts))
                packed.append([accepted, token_id] + drafts + [0] * (k - len(drafts)))
            num_proposed = torch.tensor([s.num_spec_tokens for s in verify], dtype=torch.int64)
            spec = (verify, torch.tensor(packed, dtype=torch.int64), num_proposed)  # as StepSampler._verify
        ids = torch.full((len(rows),), token_id, dtype=torch.int64) if rows else None
        if ids is None:  # _pending remembers the step's tokens only with sampled rows (as StepSampler.sample)
            sampling._remember([], None, spec)
        return sampling._pending(ModelRunnerOutput(), rows, ids, parity, spec=spec)

    runner._run_forward = lambda input_ids, positions, meta, intermediate=None: None
    sampling.sample = fake_sample


def _timed(fn, name: str, acc: dict[str, float]):
    def wrapper(*args, **kwargs):
        t = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[name] += time.thread_time() - t
    return wrapper


def _llm(ns, max_model_len: int, num_blocks: int, **kwargs):
    """The offline engine of ns's features (tiny random model on the CPU), its model removed."""
    from meshserve import LLM

    if ns.slo_ttft_ms is not None or ns.slo_tpot_ms is not None:
        kwargs.update(slo_ttft_ms=ns.slo_ttft_ms, slo_tpot_ms=ns.slo_tpot_ms)
    if ns.kv_offload_gib:
        kwargs["kv_offloading_size"] = ns.kv_offload_gib
    if ns.spec_ngram:
        kwargs["speculative_config"] = {"method": "ngram", "num_speculative_tokens": ns.spec_ngram,
                                        "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    llm = LLM(model="smollm2-135m", load_format="dummy", max_model_len=max_model_len, max_num_seqs=ns.batch,
              max_num_batched_tokens=8192, hf_overrides={"num_hidden_layers": 1}, device="cpu",
              async_scheduling=ns.async_scheduling, num_gpu_blocks_override=num_blocks, **kwargs)
    remove_model(llm.engine.runner)
    return llm.engine


def build_engine(ns):
    """An offline engine (tiny random model on the CPU, model removed) with ns's features, and its batch queued."""
    from meshserve import SamplingParams

    k = ns.spec_ngram or 0
    # every sequence decodes through all the measured steps (each may add k + 1 tokens), after the prefill
    # steps in which the first admitted ones already decode
    slo = ns.slo_ttft_ms is not None or ns.slo_tpot_ms is not None
    prefill_per_step = 1024 if slo else 8192  # under targets prompts take slo_prefill_chunk tokens per step
    prefill_steps = -(-ns.batch * ns.prompt_len // prefill_per_step) + 1
    new_tokens = (ns.steps + prefill_steps) * (k + 1) + 8
    max_model_len = ns.prompt_len + new_tokens + 8
    engine = _llm(ns, max_model_len, ns.batch * (max_model_len // 16 + 2))
    random.seed(0)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for _ in range(ns.batch):
        engine.add_request(None, [random.randint(0, 10000) for _ in range(ns.prompt_len)], params)
    return engine


class SteadyArrivals:
    """--waiting mode's requests: top_up() queues new ones (fresh random prompts) until ns.waiting wait, on a
    simulated clock that tick() moves one step period on (the scheduler's clock and the arrival times)."""

    def __init__(self, engine, ns):
        from meshserve import SamplingParams

        self.engine, self.waiting, self.prompt_len = engine, ns.waiting, ns.prompt_len
        self.params = SamplingParams(temperature=0, max_tokens=ns.max_tokens, ignore_eos=True)
        self.now = time.monotonic()
        engine.core.scheduler.clock = lambda: self.now
        self.rng = random.Random(0)

    def top_up(self) -> int:
        scheduler, added = self.engine.core.scheduler, 0
        while scheduler.num_waiting < self.waiting:
            prompt = [self.rng.randrange(10000) for _ in range(self.prompt_len)]
            self.engine.add_request(None, prompt, self.params, arrival_time=self.now)
            added += 1
        return added

    def tick(self) -> None:
        self.now += STEADY_STEP_S


def build_steady_engine(ns):
    """The --waiting mode's engine: KV for the whole running batch, the queue not yet filled."""
    kwargs = {} if ns.slo_prefill_chunk is None else {"slo_prefill_chunk": ns.slo_prefill_chunk}
    max_model_len = ns.prompt_len + ns.max_tokens * ((ns.spec_ngram or 0) + 1) + 8
    return _llm(ns, max_model_len, (ns.batch + 8) * (max_model_len // 16 + 2), **kwargs)


def _warm_up(engine, ns, steady: SteadyArrivals | None) -> None:
    """Step until the measured steps may start: the prompts prefilled (default), or (--waiting) the running
    batch turned over once (the first requests finished: admissions and finishes now come in every step)."""
    if steady is None:
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.seqs.values()):
            engine.step()  # prefill
    else:
        finished = 0
        while not finished:
            steady.top_up()
            finished += sum(o.finished for o in engine.step())
            steady.tick()
    for _ in range(ns.warmup):
        if steady is not None:
            steady.top_up()
        engine.step()
        if steady is not None:
            steady.tick()


def run_host_overhead(ns) -> dict:
    steady_mode = getattr(ns, "waiting", None) is not None
    engine = build_steady_engine(ns) if steady_mode else build_engine(ns)
    steady = SteadyArrivals(engine, ns) if steady_mode else None
    if steady is not None:
        # as the serving core process does once its model is loaded (core_process.py): the start-up objects are
        # frozen, so the full collections that serving's allocations trigger do not walk them (~70 ms a time here)
        freeze_startup_heap()
    try:
        return _measure(engine, ns, steady)
    finally:
        if steady is not None:
            gc.unfreeze()


def _measure(engine, ns, steady: SteadyArrivals | None) -> dict:
    core = engine.core
    _warm_up(engine, ns, steady)
    acc: dict[str, float] = defaultdict(float)
    core._schedule = _timed(core._schedule, "schedule", acc)
    core._process = _timed(core._process, "process", acc)
    core.scheduler_stats = _timed(core.scheduler_stats, "stats", acc)
    engine.runner._prepare = _timed(engine.runner._prepare, "prepare", acc)
    engine.runner.launch = _timed(engine.runner.launch, "launch", acc)
    engine.output_processor.process_outputs = _timed(engine.output_processor.process_outputs, "frontend", acc)
    wall_s, cpu_s, parts, batch, tokens = [], [], defaultdict(list), 0, 0
    arrivals_s, admitted, finished, waiting, shed = [], 0, 0, 0, core.num_shed
    for _ in range(ns.steps):
        if steady is not None:
            c = time.thread_time()
            steady.top_up()
            arrivals_s.append(time.thread_time() - c)
            waiting += engine.scheduler.num_waiting
            running_before = {s.seq_id for s in engine.scheduler.running}
        batch += engine.scheduler.num_running
        before = core.num_generated_tokens
        acc.clear()
        t, c = time.perf_counter(), time.thread_time()
        outputs = engine.step()
        cpu_s.append(time.thread_time() - c)
        wall_s.append(time.perf_counter() - t)
        tokens += core.num_generated_tokens - before
        acc["launch"] -= acc["prepare"]  # prepare runs inside launch
        for name in COMPONENTS:
            parts[name].append(acc[name])
        parts["other"].append(cpu_s[-1] - sum(acc[name] for name in COMPONENTS))
        if steady is not None:
            steady.tick()
            finished += sum(o.finished for o in outputs)
            admitted += sum(s.seq_id not in running_before for s in engine.scheduler.running)
    # medians over the steps: a garbage collection or a wait for a core lands in a few steps, not in all
    per_step = {f"{name}_ms": 1e3 * statistics.median(parts[name]) for name in (*COMPONENTS, "other")}
    res = {"bench": "host overhead per decode step (CPU)", "batch": ns.batch, "mean_running": batch / ns.steps,
           "tokens_per_step": tokens / ns.steps, "steps": ns.steps, "async_scheduling": ns.async_scheduling,
           "slo_ttft_ms": ns.slo_ttft_ms, "slo_tpot_ms": ns.slo_tpot_ms, "kv_offload_gib": ns.kv_offload_gib,
           "spec_ngram": ns.spec_ngram, "step_cpu_ms": 1e3 * statistics.median(cpu_s),
           "step_cpu_mean_ms": 1e3 * sum(cpu_s) / ns.steps, "step_wall_ms": 1e3 * statistics.median(wall_s),
           **per_step}
    if steady is not None:
        # the engine core's share (the front end runs in the API server processes when serving), the arrivals'
        # own cost (queued outside the step), and the traffic: admissions and finishes in every step
        res.update(bench="host overhead per steady-state step (CPU)", mean_waiting=waiting / ns.steps,
                   admitted_per_step=admitted / ns.steps, finished_per_step=finished / ns.steps,
                   shed=core.num_shed - shed, max_tokens=ns.max_tokens, slo_prefill_chunk=ns.slo_prefill_chunk,
                   core_cpu_ms=1e3 * statistics.median(c - f for c, f in zip(cpu_s, parts["frontend"])),
                   arrivals_ms=1e3 * statistics.median(arrivals_s))
    return res


def _check(p: argparse.ArgumentParser, ns) -> argparse.Namespace:
    """The --waiting mode's flags only make sense together: a one-line usage error otherwise."""
    if ns.waiting is None:
        for flag, value in (("--max-tokens", ns.max_tokens), ("--slo-prefill-chunk", ns.slo_prefill_chunk)):
            if value is not None:
                p.error(f"{flag} needs --waiting (the steady-state mode)")
    elif ns.max_tokens is None:
        ns.max_tokens = 128
    return ns


def add_host_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("host", help="engine host-side time per decode step, model removed (CPU)")
    p.add_argument("--batch", type=positive_int, default=256)
    p.add_argument("--prompt-len", type=positive_int, default=512)
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--warmup", type=non_negative_int, default=3, help="decode steps run before the measured ones")
    p.add_argument("--async-scheduling", action="store_true", help="schedule step n+1 before step n's tokens")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="time-to-first-token target (SLO scheduling)")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="time-per-output-token target (SLO scheduling)")
    p.add_argument("--kv-offload-gib", type=non_negative_float, default=None,
                   help="KV offload CPU tier of this many GiB (0: none)")
    p.add_argument("--spec-ngram", type=positive_int, default=None, metavar="K",
                   help="n-gram speculation proposing up to K tokens (the fake model accepts proposals of its token)")
    p.add_argument("--waiting", type=positive_int, default=None, metavar="N",
                   help="steady-state mode: keep N requests queued (topped up every step) in front of the running "
                        "batch; requests finish and are admitted in every step (default: decode-only steps)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="with --waiting: output tokens of each request (default 128)")
    p.add_argument("--slo-prefill-chunk", type=positive_int, default=None,
                   help="with --waiting: prompt tokens a step may take beside its decodes under targets "
                        "(default: the engine's)")
    p.set_defaults(func=lambda ns: print_table(run_host_overhead(_check(p, ns))) or 0)
