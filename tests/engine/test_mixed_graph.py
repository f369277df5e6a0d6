"""Mixed-step graphs on the CPU: the bucket ladder, the padding, and greedy tokens of the padded forward.

CUDA graphs cannot run here, so MixedStepGraphs(replay=False) runs the forward eagerly on the padded static
buffers with the padded metadata; the torch reference attention must then give every real row what the
plain forward gives (tests/gpu/test_mixed_graphs.py replays real graphs).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from meshserve import LLM, SamplingParams
from meshserve.config import EngineArgs
from meshserve.engine.mixed_graph import (
    MixedStepGraphs,
    graph_pool_reserve_bytes,
    mixed_graphs_unsupported,
    token_buckets,
)
from meshserve.engine.scheduler_output import ScheduledSequence
from meshserve.errors import InvalidArgumentError
from meshserve.spec_decode.config import parse_speculative_config
from tests.conftest import VOCAB

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def test_token_buckets_ladder_pads_at_most_an_eighth():
    buckets = token_buckets(512, 8192)
    assert buckets[:9] == [16, 32, 48, 64, 80, 96, 112, 128, 144]
    assert buckets[15:18] == [256, 288, 320] and buckets[-3:] == [448, 480, 512] and len(buckets) == 24
    assert all(b % 16 == 0 for b in buckets) and buckets == sorted(set(buckets))
    for n in range(1, 513):  # under 16 tokens of padding up to 256, and from 128 tokens on within 12.5%
        pad = next(b for b in buckets if b >= n) - n
        assert (n > 256 or pad < 16) and (n < 128 or pad <= n / 8), n
    assert token_buckets(2048, 8192)[-4:] == [1664, 1792, 1920, 2048]
    # capped at the step budget, which is always a bucket; 0 turns them off
    assert token_buckets(512, 200)[-2:] == [192, 200]
    assert token_buckets(8, 8192) == [8]
    assert token_buckets(0, 8192) == [] and token_buckets(512, 0) == []


def test_bucket_for_needs_enough_sequence_slots():
    graphs = MixedStepGraphs(
        lambda *a: None,
        [16, 32, 64],
        max_num_seqs=20,
        max_model_len=64,
        block_size=4,
        device=torch.device("cpu"),
        replay=False,
    )
    assert [graphs.num_seq_slots(t) for t in graphs.buckets] == [16, 20, 20]
    assert graphs.bucket_for(10, 3) == 16
    assert graphs.bucket_for(16, 16) == 16
    assert graphs.bucket_for(17, 2) == 32
    assert graphs.bucket_for(65, 1) is None
    assert graphs.block_tables.shape == (20, 16) and graphs.query_start_loc.shape == (21,)
    with pytest.raises(RuntimeError, match="captures nothing"):
        graphs.capture()


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return LLM(
        model=tiny_model_dir("llama"),
        block_size=4,
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=48,
        enable_prefix_caching=False,
        seed=0,
    )


def _mixed_batch() -> list[ScheduledSequence]:
    """A prefill chunk and three decode rows on blocks 1.. (the pool's last block stays unused)."""
    params = SamplingParams(temperature=0)
    seqs = [ScheduledSequence("p", _ids(1, 13), 0, [1, 2, 3, 4], params, True)]
    for i, ctx in enumerate((9, 5, 17)):
        first = 5 + 5 * i
        table = list(range(first, first + -(-ctx // 4)))
        seqs.append(ScheduledSequence(f"d{i}", _ids(10 + i, 1), ctx - 1, table, params, True))
    return seqs


@torch.inference_mode()
def test_padded_forward_keeps_real_rows_and_writes_no_padding(llama):
    runner = llama.engine.runner
    graphs = runner.build_mixed_graphs(replay=False)
    assert graphs.buckets == [16, 32, 48]
    seqs = _mixed_batch()
    input_ids, positions, meta = runner._prepare(seqs)
    assert input_ids.shape[0] == 16 and meta.max_query_len == 13
    for kv in runner.kv_pool.tensors:
        kv.zero_()
    plain = runner.forward(input_ids, positions, meta).clone()
    cache_plain = [kv.clone() for kv in runner.kv_pool.tensors]
    for kv in runner.kv_pool.tensors:
        kv.zero_()
    input_ids, positions, meta = runner._prepare(seqs[1:] + seqs[:1])  # 16 tokens in 4 of 8 sequence slots
    padded = graphs.run(input_ids, positions, meta)
    assert graphs.runs == {16: 1} and graphs.padded_runs == 1
    input_ids, positions, meta = runner._prepare(seqs[:3])  # 15 tokens: a trailing token in no sequence
    trailing = graphs.run(input_ids, positions, meta)
    assert graphs.runs == {16: 2} and graphs.padded_runs == 2
    assert padded.shape == plain.shape and trailing.shape[0] == 15
    torch.testing.assert_close(padded[3:], plain[:13], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[:3], plain[13:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trailing, plain[:15], rtol=1e-5, atol=1e-5)
    for a, b in zip(runner.kv_pool.tensors, cache_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not a[:, 0].any() and not a[:, -1].any()  # padding (slot -1) wrote no block


def _greedy(llm: LLM, prompts) -> list[list[int]]:
    params = [
        SamplingParams(temperature=0, max_tokens=6 + i % 4, ignore_eos=True) for i in range(len(prompts))
    ]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_engine_greedy_tokens_same_with_padded_mixed_steps(family, tiny_model_dir, llama):
    llm = (
        llama
        if family == "llama"
        else LLM(
            model=tiny_model_dir(family),
            block_size=4,
            max_model_len=128,
            max_num_seqs=8,
            max_num_batched_tokens=48,
            enable_prefix_caching=False,
            seed=0,
        )
    )
    # uneven prompts over a 48-token budget: chunks of later prompts ride beside earlier ones' decodes
    prompts = [{"prompt_token_ids": _ids(100 + i, n)} for i, n in enumerate((37, 5, 61, 12, 29, 3))]
    expected = _greedy(llm, prompts)
    runner = llm.engine.runner
    graphs = runner.build_mixed_graphs(replay=False)
    mixed_steps = []
    real_run = graphs.run

    def spy(input_ids, positions, meta, intermediate=None):
        q_lens = [b - a for a, b in zip(meta.query_start_loc_cpu, meta.query_start_loc_cpu[1:])]
        mixed_steps.append(max(q_lens) > 1 and min(q_lens) == 1)
        return real_run(input_ids, positions, meta, intermediate)

    graphs.run = spy
    runner.mixed_graphs = graphs
    try:
        got = _greedy(llm, prompts)
    finally:
        runner.mixed_graphs = None
    assert got == expected
    assert sum(mixed_steps) >= 3  # prefill chunks beside decode rows went through the padded buffers
    assert graphs.padded_runs >= 3 and len(graphs.runs) >= 2


def test_unsupported_reasons_and_memory_reserve(llama):
    config = llama.engine.runner.config
    assert config.max_cudagraph_tokens == 2048
    assert mixed_graphs_unsupported(config, "triton") is None
    assert "torch" in mixed_graphs_unsupported(config, "torch")
    assert "turned off" in mixed_graphs_unsupported(dataclasses.replace(config, enforce_eager=True), "triton")
    assert "turned off" in mixed_graphs_unsupported(
        dataclasses.replace(config, max_cudagraph_tokens=0), "triton"
    )
    # verify steps replay the graphs too (tests/spec_decode/test_spec_graphs.py)
    spec = dataclasses.replace(config, speculative_config=parse_speculative_config(NGRAM))
    assert mixed_graphs_unsupported(spec, "triton") is None
    # the reserve scales the profiled activations (48 tokens) to the largest bucket
    assert graph_pool_reserve_bytes(4800, config) == 4800
    assert graph_pool_reserve_bytes(4800, dataclasses.replace(config, max_cudagraph_tokens=16)) == 1600
    assert graph_pool_reserve_bytes(4800, dataclasses.replace(config, max_cudagraph_tokens=0)) == 0


def test_max_cudagraph_tokens_validated():
    with pytest.raises(InvalidArgumentError, match="max_cudagraph_tokens: must be >= 0"):
        EngineArgs(max_cudagraph_tokens=-1).validate()


def test_pipeline_stage_input_padded_and_cut():
    """A later pipeline stage: received activations go into the static stage buffers (padded rows too) and
    come back cut to the real rows."""
    from meshserve.kernels.attention_metadata import AttentionMetadata
    from meshserve.layers.pipeline import IntermediateTensors

    seen = {}

    def forward(input_ids, positions, meta, intermediate):
        seen["tokens"], seen["meta"] = input_ids.shape[0], meta
        return IntermediateTensors(intermediate.hidden * 2, intermediate.residual + positions[:, None])

    graphs = MixedStepGraphs(
        forward,
        [16, 32],
        max_num_seqs=4,
        max_model_len=32,
        block_size=4,
        device=torch.device("cpu"),
        stage_input=(3, torch.float32),
        replay=False,
    )
    meta = AttentionMetadata(
        slot_mapping=torch.arange(18),
        query_start_loc=torch.tensor([0, 17, 18]),
        seq_lens=torch.tensor([17, 5]),
        block_tables=torch.zeros(2, 5, dtype=torch.int64),
        max_query_len=17,
        max_seq_len=17,
        query_start_loc_cpu=[0, 17, 18],
        seq_lens_cpu=[17, 5],
    )
    hidden, residual = torch.randn(18, 3), torch.randn(18, 3)
    positions = torch.cat([torch.arange(17), torch.tensor([4])])
    out = graphs.run(
        torch.ones(18, dtype=torch.int64), positions, meta, IntermediateTensors(hidden, residual)
    )
    assert seen["tokens"] == 32 and seen["meta"].graph_bound and seen["meta"].max_query_len == 32
    assert seen["meta"].query_start_loc_cpu == [0, 17, 18, 18, 18] and seen["meta"].seq_lens_cpu == [
        17,
        5,
        0,
        0,
    ]
    assert graphs.slot_mapping[18:].eq(-1).all() and graphs.positions[18:].eq(0).all()
    torch.testing.assert_close(out.hidden, hidden * 2)
    torch.testing.assert_close(out.residual, residual + positions[:, None])
