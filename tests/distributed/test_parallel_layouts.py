"""TP, PP and TP x PP on CPU (gloo): greedy tokens identical to one device and to HF transformers."""

from __future__ import annotations

import random

import pytest

from meshserve import LLM, SamplingParams
from tests.conftest import VOCAB

MAX_NEW = 8


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def _generate(path: str, prompts, **kw):
    llm = LLM(model=path, **kw)
    workers = getattr(llm.engine.core.executor, "workers", {})
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = [o.outputs[0].token_ids for o in outs], llm.engine.stats()
    finally:
        llm.shutdown()
    # a clean shutdown lets every rank leave by itself within the driver's wait (-9: it was killed)
    assert {rank: p.exitcode for rank, p in workers.items()} == dict.fromkeys(workers, 0)
    return result


@pytest.fixture(scope="module")
def reference(tiny_model_dir, hf_model):
    """Single-device tokens for three regimes; HF agrees with the first (checked in test_engine_vs_hf)."""
    from tests.engine.test_engine_vs_hf import hf_greedy

    path = tiny_model_dir("qwen2")
    # the last two share a 16-token prefix, so prefix-cache hits happen under every layout
    prompts = _prompts(0, (5, 19, 33, 12))
    prompts += [prompts[1][:16] + [7, 8, 9], prompts[1][:16] + [10, 11]]
    single, _ = _generate(path, prompts)
    assert single == [hf_greedy(hf_model(path), p, MAX_NEW) for p in prompts]
    return path, prompts, single


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_layout_matches_single_device(tp, pp, reference):
    path, prompts, single = reference
    # chunked prefill (budget 16) and preemption (12 blocks of 4) in the same run
    got, stats = _generate(path, prompts, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                           max_num_batched_tokens=16, block_size=4, num_gpu_blocks_override=12)
    assert got == single
    assert stats["num_preemptions"] > 0
    assert stats["prefix_cache_hits"] > 0
    if pp > 1:
        assert 0.0 <= stats["pp_bubble"] < 1.0


@pytest.fixture(scope="class")
def llama_tp2(tiny_model_dir):
    path = tiny_model_dir("llama")
    rng = random.Random(5)
    prefix = [rng.randrange(3, VOCAB) for _ in range(24)]
    prompts = [prefix + [rng.randrange(3, VOCAB) for _ in range(n)] for n in (2, 4, 6)]
    single_tokens, _ = _generate(path, prompts, block_size=4)
    single = LLM(model=path)
    single_bytes = single.engine.executor.gather_rpc("param_bytes")[0]
    single.shutdown()
    llm = LLM(model=path, block_size=4, tensor_parallel_size=2, max_num_seqs=1)
    yield llm, prompts, single_tokens, single_bytes
    llm.shutdown()


class TestOneTP2Engine:
    """Tests that need one TP = 2 engine and only read its weights or run their own prompts through it share it
    (starting the ranks is most of such a test's time). The engine is the process's distributed world while it
    lives, so the single-device figures are taken before it starts and it ends with the class."""

    def test_tp2_prefix_cache_hits(self, llama_tp2):
        llm, prompts, single, _ = llama_tp2
        hits_before = llm.engine.stats()["prefix_cache_hits"]
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        assert got == single and llm.engine.stats()["prefix_cache_hits"] - hits_before >= 48

    def test_each_tp_rank_holds_about_half_the_weights(self, llama_tp2):
        llm, _, _, total = llama_tp2
        per_rank = llm.engine.executor.gather_rpc("param_bytes")
        assert len(per_rank) == 2
        # everything is split except the small replicated norms
        for b in per_rank:
            assert total / 2 <= b <= total / 2 * 1.02


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


def test_tp2_schedules_ahead_and_samples_like_one_device(tiny_model_dir):
    """TP = 2 schedules step n+1 before reading step n (rank 0 broadcasts the sampled ids to rank 1 on the
    device): seeded sampling, penalties and greedy rows give one device's tokens, with and without it."""
    path = tiny_model_dir("qwen2")
    prompts = _prompts(3, (7, 21, 14, 9))
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=5 + i, max_tokens=MAX_NEW, ignore_eos=True)
              for i in range(3)] + [SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)]
    inputs = [{"prompt_token_ids": p} for p in prompts]

    def run(**kw):
        llm = LLM(model=path, **kw)
        try:
            outs = llm.generate(inputs, params, use_tqdm=False)
            return [o.outputs[0].token_ids for o in outs], llm.engine.async_scheduling
        finally:
            llm.shutdown()

    single, _ = run()
    ahead, scheduled_ahead = run(tensor_parallel_size=2)
    in_step, sync = run(tensor_parallel_size=2, async_scheduling=False)
    assert scheduled_ahead and not sync
    assert ahead == single and in_step == single


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
    core = llm.engine.core
    launch = core.executor.execute_async

    def watched(sched_out):
        watch(sched_out)
        return launch(sched_out)

    core.executor.execute_async = watched
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        extra = before_shutdown(core) if before_shutdown is not None else None
    finally:
        llm.shutdown()
    return [o.outputs[0].token_ids for o in outs], extra


def test_pp2_keeps_one_step_per_stage_in_flight(tiny_model_dir):
    """With PP = 2 the engine launches a step while the previous one is still in the pipeline (over other
    sequences), reads tokens back in step order, and gives one device's tokens, as without it."""
    path = tiny_model_dir("qwen2")
    prompts = _prompts(5, (6, 13, 22, 9, 17, 30))
    single, _ = _generate(path, prompts)

    llm = LLM(model=path, pipeline_parallel_size=2, max_num_batched_tokens=16)
    core, overlapped = llm.engine.core, []
    ahead, _ = _generate_watched(llm, prompts, lambda out: overlapped.append(len(core._pipeline) > 0))
    assert core.pipeline_depth == 2 and sum(overlapped) > len(overlapped) // 2
    in_step, _ = _generate(path, prompts, pipeline_parallel_size=2, async_scheduling=False)
    assert ahead == single and in_step == single


def test_pp2_graph_buffers_and_three_steps_in_flight(tiny_model_dir):
    """PP = 2 with three steps in flight (pipeline_depth 3: the host's round trip for a step's tokens hides
    behind the third) and every step through the graphs' static buffers on both stages (use_padded_graphs:
    the replayed graphs' buffers, run eagerly): the second stage receives in place, the first sends copies of
    its graph output; one device's tokens."""
    path = tiny_model_dir("qwen2")
    prompts = _prompts(6, (6, 13, 22, 9, 17, 30, 4))
    single, _ = _generate(path, prompts)

    llm = LLM(model=path, pipeline_parallel_size=2, pipeline_depth=3, max_num_batched_tokens=16)
    core = llm.engine.core
    assert core.pipeline_depth == 3 and core.scheduler.config.pipeline_depth == 3
    assert core.executor.collective_rpc("use_padded_graphs") >= 16  # every step fits a bucket
    in_flight = []

    def count(sched_out):
        if not sched_out.is_empty:  # (a step of finished ids only runs no forward)
            in_flight.append(len(core._pipeline))

    got, (first, last) = _generate_watched(llm, prompts, count, lambda c: c.executor.gather_rpc("stage_counts"))
    assert got == single
    assert in_flight.count(2) >= 3  # steps launched with two others still in the pipeline
    assert first["graph_steps"] == last["graph_steps"] == len(in_flight) and first["eager_steps"] == 0
    assert first["sends_copied"] == first["graph_steps"] and last["sends_copied"] == 0
    assert "handed_steps" not in first and "handed_steps" not in last  # the token hand-off is off by default


def test_pp2_each_step_in_flight_is_a_batch_of_max_num_seqs(tiny_model_dir):
    """PP = 2, three steps in flight, max_num_seqs 2: up to 3 x 2 sequences run at once, each step holds at most
    two (full steps two), and the tokens are one device's."""
    path = tiny_model_dir("qwen2")
    prompts = _prompts(7, (6, 13, 22, 9, 17, 30, 4, 11))
    single, _ = _generate(path, prompts, max_num_seqs=2)

    llm = LLM(model=path, pipeline_parallel_size=2, pipeline_depth=3, max_num_seqs=2)
    core, sizes, running = llm.engine.core, [], []

    def count(sched_out):
        if not sched_out.is_empty:
            sizes.append(len(sched_out.scheduled))
            running.append(core.scheduler.num_running)

    got, _ = _generate_watched(llm, prompts, count)
    assert got == single
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
