"""Grammar-constrained decoding inside the engine, on a tiny random model (whose free choices are noise, so
every valid output is the grammar's doing): outputs follow their schema with n > 1, preemption, prefix
caching and async scheduling on or off, unconstrained requests in the same batch are untouched, and the
constrained tokens are the same whether async scheduling is on or off; under tensor and pipeline parallel
(worker processes, slow) the tokens are one process's, and with TP the masks stay on rank 0, filled late."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from meshserve import LLM, SamplingParams
from meshserve.errors import InvalidArgumentError

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["id"], "additionalProperties": False},
    },
    "required": ["kind", "age", "ok", "tags", "owner"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("llama")


def _run(path, async_scheduling: bool, instrument=None, **kw):
    llm = LLM(model=path, async_scheduling=async_scheduling, max_model_len=256, **kw)
    if instrument is not None:
        instrument(llm.engine.core)
    constrained = SamplingParams(n=3, max_tokens=120, temperature=1.0, seed=7,
                                 structured_outputs={"json": SCHEMA})
    plain = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8] * 10, [9, 10, 11] * 10, [5, 6, 7, 8] * 10]  # the third hits the prefix cache
    try:
        outs = llm.generate(prompts, [constrained, plain, constrained], use_tqdm=False)
        return outs, llm.engine.stats()
    finally:
        llm.shutdown()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_outputs_follow_the_schema_under_preemption_and_prefix_caching(path, async_scheduling):
    outs, stats = _run(path, async_scheduling, num_gpu_blocks_override=48, block_size=4)
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    for out in (outs[0], outs[2]):
        assert len(out.outputs) == 3
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len(outs[1].outputs[0].token_ids) == 30  # the unconstrained neighbour ran as usual


def test_async_scheduling_changes_no_constrained_token(path):
    sync, _ = _run(path, False)
    async_, _ = _run(path, True)
    assert [[c.token_ids for c in o.outputs] for o in sync] == [[c.token_ids for c in o.outputs] for o in async_]


def test_batched_masks_change_no_token(path, monkeypatch):
    """The engine's one-call fill (BitmaskFiller) against the per-row reference fill: the same tokens for
    every constrained output; the unconstrained neighbour (an all-ones mask row) decodes as it does alone."""
    from meshserve.structured.bitmask import fill_bitmasks
    from meshserve.structured.bitmask_filler import BitmaskFiller

    batched, _ = _run(path, True)
    monkeypatch.setattr(BitmaskFiller, "fill", lambda self, matchers: fill_bitmasks(matchers, self.words * 32))
    per_row, _ = _run(path, True)
    assert [[c.token_ids for c in o.outputs] for o in batched] == [[c.token_ids for c in o.outputs] for o in per_row]
    llm = LLM(model=path, async_scheduling=True, max_model_len=256)
    try:
        alone = llm.generate([[9, 10, 11] * 10], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                             use_tqdm=False)[0]
    finally:
        llm.shutdown()
    assert batched[1].outputs[0].token_ids == alone.outputs[0].token_ids


def _record(events: list, name: str, fn, note=None):
    def wrapped(*a, **kw):
        events.append(name if note is None else (name, note(*a)))
        return fn(*a, **kw)
    return wrapped


@pytest.mark.slow
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_tensor_parallel_fills_the_masks_on_rank_0_after_the_step_went_out(path, async_scheduling):
    """TP 2: rank 0 alone samples, so the masks of a step are filled on rank 0 once its own forward is
    queued, after the step went out to the worker without them (nor the engine's hook); with async scheduling
    step n+1 goes out before step n is processed (in the hook). The same tokens as one process."""
    events: list = []

    def instrument(core):
        executor = core.executor
        assert core._late_masks and executor.late_grammar_masks
        channel = executor._calls  # rank 0's calls to the worker (made by the start-up calls)
        # what the worker gets of a step, as it is pickled
        channel.broadcast = _record(events, "send", channel.broadcast, lambda msg: (
            msg[0], (msg[1][0].grammar_bitmask, msg[1][0].before_sample) if msg[0] == "execute" else None))
        executor.runner.forward = _record(events, "forward", executor.runner.forward)
        core._fill_grammar_bitmasks = _record(events, "fill", core._fill_grammar_bitmasks)
        core.scheduler.update_after_step = _record(events, "update", core.scheduler.update_after_step)

    one, _ = _run(path, async_scheduling)
    two, _ = _run(path, async_scheduling, instrument=instrument, tensor_parallel_size=2)
    assert [[c.token_ids for c in o.outputs] for o in one] == [[c.token_ids for c in o.outputs] for o in two]
    for out in (two[0], two[2]):
        for c in out.outputs:
            jsonschema.validate(json.loads(c.text), SCHEMA)
    sent = [step for _, (method, step) in (e for e in events if isinstance(e, tuple)) if method == "execute"]
    assert sent and sent == [(None, None)] * len(sent)
    names = [e if isinstance(e, str) else e[1][0] for e in events]  # "execute": a step sent
    fills = [i for i, e in enumerate(names) if e == "fill"]
    assert len(fills) >= max(len(c.token_ids) for o in (two[0], two[2]) for c in o.outputs)
    # each fill comes after its step went out and its forward was queued: execute, forward, [update n], fill
    for i in fills:
        before = [e for e in names[:i] if e != "update"][-2:]
        assert before == ["execute", "forward"], names[max(0, i - 6) : i + 1]
    inside = sum(names[i - 3 : i] == ["execute", "forward", "update"] for i in fills)
    if async_scheduling:  # step n processed inside step n+1's launch: the overlap is kept
        assert inside >= len(fills) - 2, (inside, len(fills))
    else:
        assert inside == 0


@pytest.mark.slow
def test_pipeline_stages_get_the_masks_with_the_step(path):
    """PP 2: the last stage (a worker) samples, so the masks are filled before the step is sent and go with it:
    the same tokens as one process."""
    one, _ = _run(path, True)
    two, _ = _run(path, True, pipeline_parallel_size=2)
    assert [[c.token_ids for c in o.outputs] for o in one] == [[c.token_ids for c in o.outputs] for o in two]


@pytest.mark.slow
def test_tensor_parallel_late_masks_beside_speculation(path):
    """TP 2 with n-gram speculation: a repetitive unconstrained request verifies proposals while constrained
    ones (never proposed for) sample under late masks in the same steps: the same tokens as one process."""
    mixed = [0]

    def run(**kw):
        llm = LLM(model=path, max_model_len=256, speculative_config={
            "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
                  **kw)
        core = llm.engine.core
        core.speculator.gate.step_model = None  # speculate every step, whatever the acceptance
        fill = core._fill_grammar_bitmasks

        def fill_and_count(sched_out, ahead=False):  # steps that verify proposals and sample under masks together
            fill(sched_out, ahead)
            verifies = any(e.num_spec_tokens for e in sched_out.scheduled)
            mixed[0] += sched_out.grammar_bitmask is not None and verifies
        core._fill_grammar_bitmasks = fill_and_count
        constrained = SamplingParams(n=2, max_tokens=100, temperature=1.0, seed=5,
                                     structured_outputs={"json": SCHEMA})
        plain = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        try:
            outs = llm.generate([[5, 6, 7, 8] * 6, [9, 10, 11, 12] * 8], [constrained, plain], use_tqdm=False)
            return [[c.token_ids for c in o.outputs] for o in outs], outs, llm.engine.stats()
        finally:
            llm.shutdown()

    one, _, _ = run()
    mixed[0] = 0
    two, outs, stats = run(tensor_parallel_size=2)
    assert stats["spec_num_draft_tokens"] > 0 and mixed[0] > 0
    assert one == two
    for c in outs[0].outputs:
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_choice_regex_and_grammar(path):
    llm = LLM(model=path, max_model_len=256)
    try:
        def gen(**so):
            p = SamplingParams(max_tokens=40, temperature=1.0, seed=1, n=4, structured_outputs=so)
            return [c.text for c in llm.generate([[5, 6, 7]], p, use_tqdm=False)[0].outputs]

        assert set(gen(choice=["alpha", "beta gamma"])) <= {"alpha", "beta gamma"}
        assert all(len(t) == 8 and t[3] == "-" and t.replace("-", "").isdigit() for t in gen(regex=r"\d{3}-\d{4}"))
        assert all(t in ("yes!", "no") for t in gen(grammar='root ::= "yes" "!" | "no"'))
        with pytest.raises(InvalidArgumentError, match="Unclosed"):
            gen(regex="[a-")
    finally:
        llm.shutdown()


def test_a_slow_compile_holds_back_only_its_own_request(path, monkeypatch):
    """While a grammar compiles, other requests run to the end; an abort meanwhile frees it cleanly, and a
    compile that fails comes back as that request's error."""
    import threading

    import meshserve.structured.compiler as compiler_mod

    gate = threading.Event()
    real = compiler_mod.compile_structured_outputs

    def slow(compiler, params):
        gate.wait(30)
        if params.regex == "boom":
            raise RuntimeError("[01:02:03] /x/y.cc:1: compile exploded")
        return real(compiler, params)

    monkeypatch.setattr(compiler_mod, "compile_structured_outputs", slow)
    llm = LLM(model=path, max_model_len=256)
    engine = llm.engine
    try:
        engine.add_request("json", [5, 6, 7], SamplingParams(max_tokens=20, structured_outputs={"json_object": True}))
        engine.add_request("aborted", [5, 6], SamplingParams(max_tokens=5, structured_outputs={"choice": ["x"]}))
        engine.add_request("boom", [5, 6], SamplingParams(max_tokens=5, structured_outputs={"regex": "boom"}))
        engine.add_request("plain", [8, 9], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        finished = {}
        for _ in range(50):
            finished.update({o.request_id: o for o in engine.step() if o.finished})
            if "plain" in finished:
                break
        assert "plain" in finished and len(finished["plain"].outputs[0].token_ids) == 8
        assert engine.stats()["num_waiting"] == 3  # the constrained ones still wait for their grammar
        engine.abort_request("aborted")
        gate.set()
        errors = []
        for _ in range(200):
            try:
                finished.update({o.request_id: o for o in engine.step() if o.finished})
            except InvalidArgumentError as e:
                errors.append(str(e))
            if not engine.has_unfinished_requests():
                break
        assert finished["json"].outputs[0].text.startswith("{") and "aborted" not in finished
        assert any("compile exploded" in e for e in errors), errors
        # a compile that never ends: the request is refused after the timeout, not left hanging
        gate.clear()
        engine.core.grammar_waitlist.compile_timeout_s = 0.2
        engine.add_request("stuck", [5, 6], SamplingParams(max_tokens=5, structured_outputs={"regex": "stuck"}))
        with pytest.raises(InvalidArgumentError, match="did not compile within"):
            for _ in range(200):
                engine.step()
        assert not engine.has_unfinished_requests()
    finally:
        gate.set()
        llm.shutdown()


def test_masks_are_filled_while_the_forward_runs(path):
    """Late masks: a step's forward is queued before its grammar masks are filled, and with async scheduling
    a constrained request keeps the overlap: step n+1's forward is queued before step n is processed."""
    llm = LLM(model=path, async_scheduling=True, max_model_len=256)
    core = llm.engine.core
    runner, events = core.executor.runner, []
    forward, fill, update = runner.forward, core._fill_grammar_bitmasks, core.scheduler.update_after_step

    def record(name, fn):
        def wrapped(*a, **kw):
            events.append(name)
            return fn(*a, **kw)
        return wrapped

    runner.forward = record("forward", forward)
    core._fill_grammar_bitmasks = record("fill", fill)
    core.scheduler.update_after_step = record("update", update)
    try:
        p = SamplingParams(max_tokens=200, temperature=1.0, seed=2, structured_outputs={"json": SCHEMA})
        out = llm.generate([[5, 6, 7]], p, use_tqdm=False)[0].outputs[0]
        jsonschema.validate(json.loads(out.text), SCHEMA)
    finally:
        llm.shutdown()
    # step 1: forward, fill; then each step: forward n+1, process n, fill n+1
    assert events[:5] == ["forward", "fill", "forward", "update", "fill"], events[:8]
    steps = events.count("forward")
    assert steps >= len(out.token_ids) and events.count("fill") >= len(out.token_ids)
    # no step waited for the one before it to be processed before queuing its forward
    assert all(events[i + 1] == "update" for i, e in enumerate(events[:-1]) if e == "forward" and i > 0)


@pytest.mark.gpu
def test_late_masks_on_the_device_change_no_token(path):
    """On a GPU (CUDA graphs, masks filled while the forward runs, async overlap kept), constrained outputs
    validate and match the synchronous engine's token for token."""
    sync, _ = _run(path, False, device="cuda")
    async_, _ = _run(path, True, device="cuda")
    assert [[c.token_ids for c in o.outputs] for o in sync] == [[c.token_ids for c in o.outputs] for o in async_]
    for out in (async_[0], async_[2]):
        for c in out.outputs:
            jsonschema.validate(json.loads(c.text), SCHEMA)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensor_parallel_late_masks_on_the_device_change_no_token(path):
    """TP 2 on two GPUs (NCCL, CUDA graphs, rank 0's masks filled while both ranks run the forward):
    constrained outputs validate, and async scheduling (masks filled inside step n+1's launch) matches the synchronous
    engine token for token."""
    sync, _ = _run(path, False, device="cuda", tensor_parallel_size=2)
    async_, _ = _run(path, True, device="cuda", tensor_parallel_size=2)
    assert [[c.token_ids for c in o.outputs] for o in sync] == [[c.token_ids for c in o.outputs] for o in async_]
    for out in (async_[0], async_[2]):
        for c in out.outputs:
            jsonschema.validate(json.loads(c.text), SCHEMA)


def test_step_trace_marks_the_masked_steps_and_the_hosts_wait(path, tmp_path):
    """The step trace (tools/step_trace_phases.py reads it) says which steps ran under grammar masks and how
    long the host waited for each step (0 on a CPU: its steps are done when launched)."""
    trace = tmp_path / "steps.jsonl"
    _run(path, True, step_trace=str(trace))
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert rows and all("wait_s" in r and r["wait_s"] >= 0 for r in rows)
    masked = [r for r in rows if r["masked_rows"]]
    assert masked
    assert all(r["masked_rows"] <= r["seqs"] for r in masked)


def test_masks_filled_ahead_on_a_thread_give_the_same_tokens(path, monkeypatch):
    """The late masks fill on a thread and the step's sampling is queued at the next launch (runner
    DeferredOutput; the default on a GPU, forced with MESHSERVE_GRAMMAR_FILL_AHEAD=1); with =0 (the CPU's
    default) they fill in line: the same tokens, sampled or greedy, constrained or not, and the ahead run did defer its sampling."""
    from meshserve.engine import runner_output

    deferred = []
    real_init = runner_output.DeferredOutput.__init__

    def counting_init(self, finish):
        deferred.append(1)
        real_init(self, finish)

    monkeypatch.setattr(runner_output.DeferredOutput, "__init__", counting_init)
    monkeypatch.setenv("MESHSERVE_GRAMMAR_FILL_AHEAD", "1")  # a GPU's default; forced here
    ahead, _ = _run(path, True)
    assert deferred
    monkeypatch.setenv("MESHSERVE_GRAMMAR_FILL_AHEAD", "0")
    deferred.clear()
    inline, _ = _run(path, True)
    assert not deferred
    assert [[c.token_ids for c in o.outputs] for o in ahead] == [[c.token_ids for c in o.outputs] for o in inline]
