"""TP, PP and TP x PP on CPU (gloo): greedy tokens identical to one device and to HF transformers.

Starting the ranks is most of such a test's time (each imports torch), so tests that only run their own prompts
through an engine of the same configuration share it (class-scoped fixtures). The engine is the process's
distributed world while it lives: the single-device figures are taken before it starts, and it ends with its
class, before any other test starts ranks."""

from __future__ import annotations

import contextlib
import random
from typing import NamedTuple

import pytest

from meshserve import LLM, SamplingParams
from tests.conftest import VOCAB

MAX_NEW = 8


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def _greedy(llm, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


# seeded sampling (top-p) beside a greedy row: one device's tokens whatever the layout and the scheduling
SAMPLED_PROMPTS = _prompts(3, (7, 21, 14, 9))
SAMPLED_PARAMS = [SamplingParams(temperature=0.8, top_p=0.9, seed=5 + i, max_tokens=MAX_NEW, ignore_eos=True)
                  for i in range(3)] + [SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)]


def _sampled(llm) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in SAMPLED_PROMPTS], SAMPLED_PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _shut_down(llm) -> None:
    workers = dict(getattr(llm.engine.core.executor, "workers", {}))
    llm.shutdown()
    # a clean shutdown lets every rank leave by itself within the driver's wait (-9: it was killed)
    assert {rank: p.exitcode for rank, p in workers.items()} == dict.fromkeys(workers, 0)


def _generate(path: str, prompts, **kw):
    llm = LLM(model=path, **kw)
    try:
        result = _greedy(llm, prompts), llm.engine.stats()
    finally:
        _shut_down(llm)
    return result


@contextlib.contextmanager
def _watching(llm, watch):
    """watch(sched_out) called at every step llm's engine launches while the block runs; yields the core."""
    core = llm.engine.core
    launch = core.executor.execute_async

    def watched(sched_out):
        watch(sched_out)
        return launch(sched_out)

    core.executor.execute_async = watched
    try:
        yield core
    finally:
        del core.executor.execute_async  # the executor's own method again


class Reference(NamedTuple):
    path: str
    prompts: list  # three regimes; the last two share a 16-token prefix (prefix-cache hits under every layout)
    single: list  # one device's greedy tokens for them (HF's)
    sampled: list  # one device's tokens for SAMPLED_PROMPTS / SAMPLED_PARAMS
    overlap_prompts: list  # test_pipeline_keeps_one_step_per_stage_in_flight's
    overlap_single: list


@pytest.fixture(scope="module")
def reference(tiny_model_dir, hf_model) -> Reference:
    from tests.engine.test_engine_vs_hf import hf_greedy

    path = tiny_model_dir("qwen2")
    prompts = _prompts(0, (5, 19, 33, 12))
    prompts += [prompts[1][:16] + [7, 8, 9], prompts[1][:16] + [10, 11]]
    overlap_prompts = _prompts(5, (6, 13, 22, 9, 17, 30))
    llm = LLM(model=path)
    single, sampled, overlap_single = _greedy(llm, prompts), _sampled(llm), _greedy(llm, overlap_prompts)
    llm.shutdown()
    assert single == [hf_greedy(hf_model(path), p, MAX_NEW) for p in prompts]
    return Reference(path, prompts, single, sampled, overlap_prompts, overlap_single)


@pytest.fixture(scope="class", params=[(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def layout(request, reference):
    """One engine per layout for TestLayouts, with chunked prefill (budget 16) and preemption (12 blocks of 4)."""
    tp, pp = request.param
    llm = LLM(model=reference.path, tensor_parallel_size=tp, pipeline_parallel_size=pp, max_num_batched_tokens=16,
              block_size=4, num_gpu_blocks_override=12)
    yield llm, pp
    _shut_down(llm)


class TestLayouts:
    def test_layout_matches_single_device(self, layout, reference):
        llm, pp = layout
        before = llm.engine.stats()
        got = _greedy(llm, reference.prompts)
        stats = llm.engine.stats()
        assert got == reference.single
        assert stats["num_preemptions"] > before["num_preemptions"]
        assert stats["prefix_cache_hits"] > before["prefix_cache_hits"]
        if pp > 1:
            assert 0.0 <= stats["pp_bubble"] < 1.0

    def test_schedules_ahead_and_samples_like_one_device(self, layout, reference):
        """Every layout launches step n+1 before reading step n (TP alone schedules ahead, rank 0 broadcasting the
        sampled ids to rank 1 on the device; PP keeps steps in its pipeline instead): seeded sampling and greedy
        rows give one device's tokens (without either: TestOneTP2Engine,
        test_pp2_without_async_scheduling_gives_one_devices_tokens)."""
        llm, pp = layout
        assert llm.engine.async_scheduling == (pp == 1)
        assert _sampled(llm) == reference.sampled

    def test_pipeline_keeps_one_step_per_stage_in_flight(self, layout, reference):
        """With PP = 2 the engine launches a step while the previous one is still in the pipeline (over other
        sequences), reads tokens back in step order, and gives one device's tokens; TP alone has no pipeline."""
        llm, pp = layout
        overlapped = []
        with _watching(llm, lambda out: overlapped.append(len(llm.engine.core._pipeline) > 0)) as core:
            got = _greedy(llm, reference.overlap_prompts)
        assert got == reference.overlap_single
        if pp == 1:
            assert core.pipeline_depth == 0 and overlapped and not any(overlapped)
        else:
            assert core.pipeline_depth == 2 and sum(overlapped) > len(overlapped) // 2


def test_pp2_without_async_scheduling_gives_one_devices_tokens(reference):
    got, _ = _generate(reference.path, reference.overlap_prompts, pipeline_parallel_size=2,
                       max_num_batched_tokens=16, async_scheduling=False)
    assert got == reference.overlap_single


@pytest.fixture(scope="class")
def llama_tp2(tiny_model_dir):
    """TP = 2 without scheduling ahead (async_scheduling=False: each step's tokens read before the next is
    scheduled), one sequence at a time (the later prompts then hit the cached prefix in full)."""
    path = tiny_model_dir("llama")
    rng = random.Random(5)
    prefix = [rng.randrange(3, VOCAB) for _ in range(24)]
    prompts = [prefix + [rng.randrange(3, VOCAB) for _ in range(n)] for n in (2, 4, 6)]
    single = LLM(model=path, block_size=4)
    single_tokens, single_sampled = _greedy(single, prompts), _sampled(single)
    single_bytes = single.engine.executor.gather_rpc("param_bytes")[0]
    single.shutdown()
    llm = LLM(model=path, block_size=4, tensor_parallel_size=2, max_num_seqs=1, async_scheduling=False)
    yield llm, prompts, single_tokens, single_bytes, single_sampled
    _shut_down(llm)


class TestOneTP2Engine:
    """Tests that need one TP = 2 engine and only read its weights or run their own prompts through it."""

    def test_tp2_prefix_cache_hits(self, llama_tp2):
        llm, prompts, single, _, _ = llama_tp2
        hits_before = llm.engine.stats()["prefix_cache_hits"]
        got = _greedy(llm, prompts)
        assert got == single and llm.engine.stats()["prefix_cache_hits"] - hits_before >= 48

    def test_each_tp_rank_holds_about_half_the_weights(self, llama_tp2):
        llm, _, _, total, _ = llama_tp2
        per_rank = llm.engine.executor.gather_rpc("param_bytes")
        assert len(per_rank) == 2
        # everything is split except the small replicated norms
        for b in per_rank:
            assert total / 2 <= b <= total / 2 * 1.02

    def test_tp2_in_step_samples_like_one_device(self, llama_tp2):
        llm, _, _, _, single_sampled = llama_tp2
        assert not llm.engine.async_scheduling
        assert _sampled(llm) == single_sampled

@pytest.mark.slow
def test_uneven_pp_partition(tmp_path):
    from tests.conftest import make_tiny_checkpoint

    # three layers, so that the partition is uneven (the shared tiny models have two)
    path = make_tiny_checkpoint(str(tmp_path), "llama", num_hidden_layers=3)
    prompts = _prompts(1, (7, 9))
    single, _ = _generate(path, prompts)
    got, _ = _generate(path, prompts, pipeline_parallel_size=2, pp_layer_partition=[2, 1])
    assert got == single


@pytest.fixture(scope="module")
def one_kv_head_model(tmp_path_factory) -> str:
    """The tiny llama with 4 attention heads sharing one KV head (multi-query attention)."""
    from tests.conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-llama-mqa")), "llama", num_key_value_heads=1)


@pytest.mark.slow
def test_tp2_replicates_a_single_kv_head(one_kv_head_model):
    """4 attention heads, 1 KV head: at TP=2 the KV head lives on both ranks (two ranks, not four, show the
    replication; test_tp4_replicates_kv_heads runs the 4-rank case with -m slow)."""
    prompts = _prompts(3, (6, 13))
    single, _ = _generate(one_kv_head_model, prompts)
    got, _ = _generate(one_kv_head_model, prompts, tensor_parallel_size=2)
    assert got == single


@pytest.mark.slow  # four ranks on two cores; the replication itself: test_tp2_replicates_a_single_kv_head
def test_tp4_replicates_kv_heads(tiny_model_dir):
    """4 attention heads, 2 KV heads: at TP=4 each KV head lives on two ranks."""
    path = tiny_model_dir("llama")
    prompts = _prompts(3, (6, 13))
    single, _ = _generate(path, prompts)
    got, _ = _generate(path, prompts, tensor_parallel_size=4)
    assert got == single


@pytest.mark.slow
def test_dummy_weights_are_the_same_under_every_layout(tiny_model_dir):
    """Dummy weights are drawn per full checkpoint tensor and then sharded, so a TP or PP run on them gives
    one device's tokens (what the GPU layout tests and benchmarks rely on)."""
    path = tiny_model_dir("llama")
    prompts = _prompts(4, (6, 17))
    single, _ = _generate(path, prompts, load_format="dummy", seed=3)
    tp, _ = _generate(path, prompts, load_format="dummy", seed=3, tensor_parallel_size=2)
    pp, _ = _generate(path, prompts, load_format="dummy", seed=3, pipeline_parallel_size=2)
    other, _ = _generate(path, prompts, load_format="dummy", seed=4)
    assert tp == single and pp == single
    assert other != single


def _generate_watched(llm, prompts, watch, before_shutdown=None):
    """Greedy tokens of llm for prompts, with watch(sched_out) called at every step the engine launches, then
    llm shut down; before_shutdown(core)'s result goes with the tokens."""
    try:
        with _watching(llm, watch) as core:
            tokens = _greedy(llm, prompts)
        extra = before_shutdown(core) if before_shutdown is not None else None
    finally:
        llm.shutdown()
    return tokens, extra


@pytest.fixture(scope="class")
def pp2_three_in_flight(tiny_model_dir):
    """PP = 2 with three steps in flight (pipeline_depth 3: the host's round trip for a step's tokens hides behind
    the third), max_num_seqs 2, every step through the graphs' static buffers on both stages (use_padded_graphs:
    the replayed graphs' buffers, run eagerly); one device's tokens for TestPP2ThreeStepsInFlight's prompts first."""
    path = tiny_model_dir("qwen2")
    single = {seed: _single_device(path, prompts) for seed, prompts in PP3_PROMPTS.items()}
    llm = LLM(model=path, pipeline_parallel_size=2, pipeline_depth=3, max_num_batched_tokens=16, max_num_seqs=2)
    core = llm.engine.core
    assert core.pipeline_depth == 3 and core.scheduler.config.pipeline_depth == 3
    assert core.executor.collective_rpc("use_padded_graphs") >= 16  # every step fits a bucket
    yield llm, single
    _shut_down(llm)


PP3_PROMPTS = {6: _prompts(6, (6, 13, 22, 9, 17, 30, 4)), 7: _prompts(7, (6, 13, 22, 9, 17, 30, 4, 11))}


def _single_device(path: str, prompts) -> list[list[int]]:
    """One device's greedy tokens, with max_num_seqs 2 as the engine under test (a batch size that must not change
    a greedy token)."""
    return _generate(path, prompts, max_num_seqs=2)[0]


class TestPP2ThreeStepsInFlight:
    def test_pp2_graph_buffers_and_three_steps_in_flight(self, pp2_three_in_flight):
        """The second stage receives in place, the first sends copies of its graph output; one device's tokens."""
        llm, single = pp2_three_in_flight
        core, in_flight = llm.engine.core, []

        def count(sched_out):
            if not sched_out.is_empty:  # (a step of finished ids only runs no forward)
                in_flight.append(len(core._pipeline))

        counts_before = core.executor.gather_rpc("stage_counts")
        with _watching(llm, count):
            got = _greedy(llm, PP3_PROMPTS[6])
        first, last = ({k: v - before.get(k, 0) for k, v in after.items()}
                       for before, after in zip(counts_before, core.executor.gather_rpc("stage_counts")))
        assert got == single[6]
        assert in_flight.count(2) >= 3  # steps launched with two others still in the pipeline
        assert first["graph_steps"] == last["graph_steps"] == len(in_flight) and first["eager_steps"] == 0
        assert first["sends_copied"] == first["graph_steps"] and last["sends_copied"] == 0
        assert "handed_steps" not in first and "handed_steps" not in last  # the token hand-off is off by default

    def test_pp2_each_step_in_flight_is_a_batch_of_max_num_seqs(self, pp2_three_in_flight):
        """Up to 3 x 2 sequences run at once, each step holds at most two (full steps two), and the tokens are one
        device's."""
        llm, single = pp2_three_in_flight
        core, sizes, running = llm.engine.core, [], []

        def count(sched_out):
            if not sched_out.is_empty:
                sizes.append(len(sched_out.scheduled))
                running.append(core.scheduler.num_running)

        with _watching(llm, count):
            got = _greedy(llm, PP3_PROMPTS[7])
        assert got == single[7]
        assert max(sizes) == 2 and sizes.count(2) > len(sizes) // 2
        assert max(running) == 6 == core.scheduler.max_running


def test_pp2_token_handoff_launches_a_sequence_before_its_token_is_back(tiny_model_dir):
    """pp_token_handoff: the last stage sends each step's sampled ids to the first stage, so with three steps in
    flight a sequence runs every other step, its input token (-1 on the host) taken from the samples of the step
    two before; the flag reaches both ranks (each counts the steps it handed on or took), the steps hold half the
    running sequences each (not a third), and the tokens are one device's (PP = 1)."""
    path = tiny_model_dir("qwen2")
    prompts = _prompts(8, (6, 13, 22, 9, 17, 30, 4, 11))
    single, _ = _generate(path, prompts)

    llm = LLM(model=path, pipeline_parallel_size=2, pipeline_depth=3, pp_token_handoff=True)
    core = llm.engine.core
    workers = core.executor.workers
    holes, sizes = [], []

    def count(sched_out):
        if not sched_out.is_empty:
            holes.append(sum(-1 in e.token_ids for e in sched_out.scheduled))
            sizes.append((len(sched_out.scheduled), core.scheduler.num_running))

    got, (first, last) = _generate_watched(llm, prompts, count, lambda c: c.executor.gather_rpc("stage_counts"))
    assert core.scheduler.handoff_lag == 2
    assert got == single
    assert last["handed_steps"] >= first["handed_steps"] > 0  # the first stage takes all but the last lag steps'
    assert {rank: p.exitcode for rank, p in workers.items()} == {1: 0}  # its last sends were taken: a clean exit
    assert sum(h > 0 for h in holes) > len(holes) // 2  # most steps ran sequences whose token was in flight
    assert (4, 8) in sizes  # eight running: four per step
