"""The start-up warm-up of eager step variants (engine/eager_warmup.py): its steps are well formed, it runs the
mixed step at every KV split count the decode heuristic may pick, and it runs through a real runner."""

from __future__ import annotations

import pytest
import torch

from meshserve.engine.eager_warmup import (
    StepBounds,
    context_prefill_steps,
    decode_steps,
    forced_decode_splits,
    fresh_prefill_steps,
    grid_tile_steps,
    max_decode_splits,
    mixed_step,
    split_counts,
    warm_up_draft_model,
    warm_up_eager_steps,
)
from meshserve.kernels.triton_attention import TritonAttentionBackend


class _Layer:
    def __init__(self, backend):
        self.backend = backend


def test_context_prefill_steps_cover_each_chunk_length_behind_a_cached_block():
    steps = context_prefill_steps(block_size=16, num_blocks=100, limit=512)
    assert [s[0].num_new_tokens for s in steps] == [2, 4, 8, 16, 32, 64, 128, 256, 512]
    for (seq,) in steps:
        assert seq.num_computed_tokens == 16 and not seq.do_sample
        assert len(seq.block_table) * 16 >= 16 + seq.num_new_tokens
    assert len(context_prefill_steps(block_size=16, num_blocks=3, limit=512)) == 5  # up to 32 + 16 tokens fit


def test_mixed_step_is_a_prefill_chunk_beside_a_decode_row_on_disjoint_blocks():
    prefill, decode = mixed_step(block_size=16, num_blocks=10)
    assert prefill.num_new_tokens > 1 and prefill.num_computed_tokens == 0
    assert decode.num_new_tokens == 1 and decode.num_computed_tokens == 32
    assert not set(prefill.block_table) & set(decode.block_table)
    assert max(prefill.block_table + decode.block_table) < 10
    assert mixed_step(block_size=16, num_blocks=3) is None


def test_split_counts_are_the_heuristics_powers_of_two():
    assert split_counts(64) == [1, 2, 4, 8, 16, 32, 64]
    assert split_counts(1) == [1] and split_counts(0) == []


def test_forced_decode_splits_sets_and_restores_each_heuristic_backend_once():
    shared, own, fixed = (
        TritonAttentionBackend(),
        TritonAttentionBackend(max_decode_splits=8),
        TritonAttentionBackend(4),
    )
    layers = [_Layer(shared), _Layer(shared), _Layer(own), _Layer(fixed), _Layer(object()), object()]
    assert max_decode_splits(layers) == 64  # the heuristic ones only (fixed: 4 always)
    with forced_decode_splits(layers, 16) as backends:
        assert len(backends) == 2 and {b.decode_num_splits for b in backends} == {16}  # shared once
        assert fixed.decode_num_splits == 4  # a configured count compiles one variant: left alone
    assert shared.decode_num_splits is None and own.decode_num_splits is None and fixed.decode_num_splits == 4


def test_warm_up_runs_the_mixed_step_at_every_split_count():
    backend = TritonAttentionBackend(max_decode_splits=16)
    layers = [_Layer(backend)]
    seen = []

    def prepare(step):
        return (step,)

    def forward(step):
        seen.append(([s.num_new_tokens for s in step], backend.decode_num_splits))

    n = warm_up_eager_steps(prepare, forward, layers, 16, 100, 8, torch.device("cpu"))
    # chunks behind a cached block, decode-only steps of 1 and 2 rows, then the mixed step per split count
    assert seen[:5] == [([2], None), ([4], None), ([8], None), ([1], None), ([1, 1], None)]
    assert [splits for _, splits in seen[5:]] == [1, 2, 4, 8, 16]
    assert all(len(tokens) == 2 for tokens, _ in seen[5:]) and n == len(seen) == 10
    assert backend.decode_num_splits is None
    seen.clear()
    warm_up_eager_steps(prepare, forward, layers, 16, 100, 4, torch.device("cpu"), fresh=True)
    assert seen[:4] == [([2], None), ([4], None), ([2], None), ([4], None)]  # fresh prompts first


class _GridBackend:
    """A backend whose decode launch takes another tile from `rows` sequences (TritonAttentionBackend's
    grid_tile_min_seqs on a GPU)."""

    decode_num_splits = 1  # no heuristic splits: only the grid steps are new

    def __init__(self, rows):
        self.rows = rows

    def grid_tile_min_seqs(self, num_kv_heads, head_dim, device, kv_fp8=False):
        self.kv_fp8 = kv_fp8
        return self.rows


class _AttnLayer(_Layer):
    num_kv_heads, head_dim = 8, 128


def test_grid_tile_steps_reach_the_smallest_batch_that_takes_the_grid_tile():
    layers = [_AttnLayer(_GridBackend(5)), _AttnLayer(_GridBackend(9)), _Layer(None)]
    decode, mixed = grid_tile_steps(layers, 16, 100, 256, torch.device("cpu"))
    assert [s.num_new_tokens for s in decode] == [1] * 5
    assert [s.num_new_tokens for s in mixed] == [16] + [1] * 5  # a prefill chunk beside the same rows
    blocks = [b for s in mixed for b in s.block_table]
    assert len(blocks) == len(set(blocks)) and max(blocks) < 100  # disjoint blocks inside the pool
    assert grid_tile_steps(layers, 16, 100, 5, torch.device("cpu")) == [decode]  # no room for the prefill
    assert grid_tile_steps(layers, 16, 100, 4, torch.device("cpu")) == []  # max_num_seqs never reaches it
    assert grid_tile_steps(layers, 16, 8, 256, torch.device("cpu")) == []  # nor does the pool
    assert grid_tile_steps([_AttnLayer(_GridBackend(None))], 16, 100, 256, torch.device("cpu")) == []
    # the rule sees the layer's cache dtype (the grid tile is fp8-only by default)
    layer = _AttnLayer(_GridBackend(5))
    layer.kv_cache = torch.zeros(2, dtype=torch.float8_e4m3fn)
    grid_tile_steps([layer], 16, 100, 256, torch.device("cpu"))
    assert layer.backend.kv_fp8
    # the Triton backend on the CPU: the interpreter keeps its tiles, no steps
    assert grid_tile_steps([_AttnLayer(TritonAttentionBackend())], 16, 100, 256, torch.device("cpu")) == []


def test_warm_up_runs_the_grid_tile_steps_with_bounds():
    seen = []
    layers = [_AttnLayer(_GridBackend(3))]
    bounds = StepBounds(max_model_len=256, max_num_seqs=64, max_num_batched_tokens=256)
    warm_up_eager_steps(lambda step: (step,), lambda step: seen.append([s.num_new_tokens for s in step]), layers,
                        16, 100, 8, torch.device("cpu"), bounds=bounds)
    assert [1, 1, 1] in seen and [16, 1, 1, 1] in seen


def test_fresh_prefill_and_decode_steps():
    fresh = fresh_prefill_steps(block_size=16, num_blocks=2, limit=512)
    assert [(s[0].num_new_tokens, s[0].num_computed_tokens) for s in fresh] == [
        (2, 0),
        (4, 0),
        (8, 0),
        (16, 0),
        (32, 0),
    ]
    one, two = decode_steps(block_size=16, num_blocks=4)
    assert [s.num_new_tokens for s in one] == [1] and [s.num_new_tokens for s in two] == [1, 1]
    assert all(s.num_computed_tokens == 16 for s in one + two)
    assert not set(two[0].block_table) & set(two[1].block_table) and max(two[1].block_table) < 4
    assert len(decode_steps(block_size=16, num_blocks=3)) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_warm_up_steps_run_through_a_real_runner(backend, tiny_model_dir, monkeypatch):
    """The steps are valid for the runner's input builder and forward (the Triton backend in the interpreter,
    forced to 1 and 2 splits to keep it short)."""
    from meshserve import LLM

    monkeypatch.setenv("MESHSERVE_ATTENTION_BACKEND", backend)
    llm = LLM(
        model=tiny_model_dir("llama"),
        block_size=4,
        max_model_len=64,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        enable_prefix_caching=False,
        num_gpu_blocks_override=64,
        seed=0,
    )
    try:
        runner = llm.engine.runner
        layers = runner.model.attention_layers()
        for layer in layers:
            if isinstance(getattr(layer, "backend", None), TritonAttentionBackend):
                layer.backend.max_decode_splits = 2
        n = warm_up_eager_steps(
            runner._prepare, runner.forward, layers, runner.block_size, 64, 4, torch.device("cpu")
        )
        assert n == 2 + 2 + (2 if backend == "triton" else 1)  # context, decode-only, mixed
        # the engine still serves afterwards
        from meshserve import SamplingParams

        out = llm.generate(
            [{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False
        )
        assert len(out[0].outputs[0].token_ids) == 3
    finally:
        llm.shutdown()


def test_draft_model_warm_up_through_a_real_engine(tiny_model_dir):
    """Speculative decoding's draft model: its own steps on its own pool, then the engine still serves."""
    from meshserve import LLM, SamplingParams

    target = tiny_model_dir("llama")
    spec = {"method": "draft_model", "model": target, "num_speculative_tokens": 2}
    llm = LLM(
        model=target,
        block_size=4,
        max_model_len=64,
        max_num_batched_tokens=32,
        num_gpu_blocks_override=64,
        speculative_config=spec,
        seed=0,
    )
    try:
        drafter = llm.engine.runner.drafter
        assert drafter is not None
        n = warm_up_draft_model(drafter, 4, 64, 8, torch.device("cpu"))
        assert n == 3 + 3 + 2 + 1  # fresh 2..8, behind a block 2..8, decode-only, one mixed (torch backend)
        out = llm.generate(
            [{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False
        )
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        llm.shutdown()


def test_a_failing_warm_up_is_logged_and_start_up_goes_on(caplog):
    from meshserve.engine.model_runner import _best_effort

    with caplog.at_level("ERROR"), _best_effort("sampling"):
        raise RuntimeError("boom")
    assert "sampling warm-up failed" in caplog.text and "boom" in caplog.text


# -- the larger steps: MLA prefill past its workspace, the MoE's tile configs (issue 29) ---------------------


def _context(step, min_query_len):
    """The step's MLA prefill context rows (kernels/mla_prefill.prefill_context: sequences of enough new
    tokens)."""
    return sum(s.num_computed_tokens + s.num_new_tokens for s in step if s.num_new_tokens >= min_query_len)


def _well_formed(step, bounds, num_blocks):
    blocks = [b for s in step for b in s.block_table]
    assert len(blocks) == len(set(blocks)) and max(blocks) < num_blocks
    assert len(step) <= bounds.max_num_seqs
    assert sum(s.num_new_tokens for s in step) <= bounds.max_num_batched_tokens
    for s in step:
        assert s.num_computed_tokens + s.num_new_tokens <= bounds.max_model_len and not s.do_sample
        assert len(s.block_table) * 16 >= s.num_computed_tokens + s.num_new_tokens


def test_chunked_query_lens_reach_every_tile_pair():
    from meshserve.engine.eager_warmup import chunked_query_lens
    from meshserve.kernels.triton_lse_merge import merge_tiles
    from meshserve.kernels.triton_mla_prefill import prefill_config

    assert chunked_query_lens(8192, 9, 128, 2) == [9, 17, 33, 65]  # DeepSeek-V2/V3 in bf16
    for v_dim, elem in ((128, 2), (24, 2), (16, 4)):
        lens = chunked_query_lens(8192, 9, v_dim, elem)
        tiles = {(prefill_config(q, elem)[0], merge_tiles(q, v_dim)[1]) for q in lens}
        assert len(tiles) == len(lens)
        assert tiles == {(prefill_config(q, elem)[0], merge_tiles(q, v_dim)[1]) for q in range(9, 8193)}
    assert chunked_query_lens(40, 9, 128, 2) == [9, 17, 33]  # a step of 40 tokens


@pytest.mark.parametrize("max_model_len", [32768, 4096, 1000])
def test_chunked_context_steps_put_each_query_length_behind_three_pieces(max_model_len):
    """The step of each query length: its longest query that length, behind a context of three workspaces (the
    merge into the fp32 accumulator and into the output), inside the scheduler's bounds."""
    from meshserve.engine.eager_warmup import StepBounds, chunked_context_steps

    bounds = StepBounds(max_model_len, 256, 8192)
    steps = chunked_context_steps(16, 100_000, 8192, bounds, [9, 17, 33, 65], min_query_len=9)
    assert [max(s.num_new_tokens for s in step) for step in steps] == [9, 17, 33, 65]
    for step in steps:
        _well_formed(step, bounds, 100_000)
        assert _context(step, 9) > 2 * 8192
        assert all(s.num_new_tokens >= 9 for s in step)


def test_chunked_context_steps_fall_back_to_two_pieces_or_none():
    from meshserve.engine.eager_warmup import StepBounds, chunked_context_steps

    lens = [9, 17, 33, 65]
    # at most 3 x 4096 rows: two pieces; 2 x 4096: one piece (nothing to warm); a pool too small: none
    two = chunked_context_steps(16, 100_000, 8192, StepBounds(4096, 3, 8192), lens, 9)
    assert len(two) == 4 and all(8192 < _context(s, 9) <= 2 * 8192 for s in two)
    assert chunked_context_steps(16, 100_000, 8192, StepBounds(4096, 2, 8192), lens, 9) == []
    assert chunked_context_steps(16, 500, 8192, StepBounds(32768, 256, 8192), lens, 9) == []


def test_token_count_steps_split_prompts_at_max_model_len():
    from meshserve.engine.eager_warmup import StepBounds, token_count_steps

    bounds = StepBounds(512, 16, 2048)
    steps = token_count_steps([1, 3, 257, 1025, 4096], 16, 10_000, bounds)
    assert [[s.num_new_tokens for s in step] for step in steps] == [[1], [3], [257], [512, 512, 1]]
    for step in steps:
        _well_formed(step, bounds, 10_000)
        assert all(s.num_computed_tokens == 0 for s in step)


class _Workspace:
    def __init__(self, chunk_tokens):
        from meshserve.kernels.mla_prefill_workspace import WorkspaceShape

        self.shape = WorkspaceShape(chunk_tokens, 256, 16, 128, 64, 128, 512, torch.bfloat16)


def test_warm_up_runs_the_token_count_and_chunked_steps_with_bounds():
    from meshserve.engine.eager_warmup import StepBounds, mla_workspace_shape

    mla = _Layer(None)
    mla.prefill_workspace = _Workspace(64)
    assert mla_workspace_shape([_Layer(None), mla]).chunk_tokens == 64
    assert mla_workspace_shape([_Layer(None)]) is None
    seen = []
    bounds = StepBounds(1024, 8, 256)
    n = warm_up_eager_steps(lambda step: (step,), lambda step: seen.append(step), [mla], 16, 1000, 8,
                            torch.device("cpu"), bounds=bounds, token_counts=[3, 200])
    sizes = [[s.num_new_tokens for s in step] for step in seen]
    # behind a block 2..8, decode-only, one mixed step (no split heuristic), the token counts, chunked steps
    assert sizes[:6] == [[2], [4], [8], [1], [1, 1], [16, 1]] and sizes[6:8] == [[3], [200]]
    chunked = seen[8:12]
    assert [step[0].num_new_tokens for step in chunked] == [9, 17, 33, 65]
    assert all(_context(step, 9) > 2 * 64 for step in chunked) and n == len(seen) == 12


def test_larger_steps_run_through_a_real_mla_moe_runner(tiny_model_dir):
    """The token-count and chunked-context steps are valid for a DeepSeek-V2 runner's input builder and
    forward (the torch path on CPU, a small workspace bound by hand: CPU runners have none), within
    max_model_len."""
    from meshserve import LLM, SamplingParams
    from meshserve.engine.eager_warmup import StepBounds
    from meshserve.kernels.mla_prefill_workspace import MLAPrefillWorkspace, WorkspaceShape

    llm = LLM(model=tiny_model_dir("deepseek_v2"), block_size=4, max_model_len=160, max_num_seqs=4,
              max_num_batched_tokens=32, enable_prefix_caching=False, num_gpu_blocks_override=200, seed=0)
    try:
        runner = llm.engine.runner
        layers = runner.model.attention_layers()
        first = layers[0]
        shape = WorkspaceShape(64, 32, first.num_heads, first.qk_nope_head_dim, first.qk_rope_head_dim,
                               first.v_head_dim, first.kv_lora_rank, torch.float32)
        workspace = MLAPrefillWorkspace(shape, "cpu")
        for layer in layers:
            layer.prefill_workspace = workspace
        seen = []

        def prepare(step):
            seen.append(step)
            return runner._prepare(step)

        n = warm_up_eager_steps(prepare, runner.forward, layers, 4, 200, 8, torch.device("cpu"),
                                bounds=StepBounds(160, 4, 32), token_counts=[3, 20])
        chunked = [s for s in seen if s[0].seq_id.startswith("warmup-chunked")]
        # fp32, 24-wide values: BLOCK_Q 16 / merge BLOCK_T 16 from 9 new tokens, 32 / 32 from 17
        assert [s[0].num_new_tokens for s in chunked] == [9, 17]
        assert all(_context(s, 9) > 2 * 64 for s in chunked)  # 160-token sequences: one holds no three pieces
        assert n == 3 + 2 + 1 + 2 + 2
        for layer in layers:
            layer.prefill_workspace = None
        out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=3),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
    finally:
        llm.shutdown()
