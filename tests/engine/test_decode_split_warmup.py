"""The start-up warm-up builds every variant of the decode reduce kernel that serving can pick (issue 29: an
H200 serving run of a tiny DeepSeek-V2 met _decode_reduce_kernel at SPLITS_PAD 2 and 4 after start-up). The KV
split counts the decode rules return over every batch size and context length the split kernel serves must be
among the counts the eager warm-up forces its mixed step to (eager_warmup.mixed_split_counts), for MLA layers
(triton_mla.decode_split_count) and the Triton attention backend alike; and an MLA layer's forced count must
reach its decode kernel."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from meshserve.engine.eager_warmup import forced_decode_splits, max_decode_splits, mixed_split_counts
from meshserve.layers.backend_selection import PLAIN
from meshserve.layers.mla_attention import MLAAttention

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

# a context of each length cap the rules give (a split per 256 tokens: 1..257 splits' worth, past the 64 cap)
CONTEXTS = [k * 256 + 1 for k in range(257)]
ROWS = [*range(1, 140), 300]  # every batch up to past the largest SM count below (from there on: one split)


def _mla(heads: int, rank: int, **kernels) -> MLAAttention:
    layer = MLAAttention(heads, 16, 16, 16, rank, 0.25)
    layer.kernels = replace(PLAIN, attention_backend="triton", **kernels)
    return layer


def _pads(counts) -> set[int]:
    """The reduce kernel's SPLITS_PAD of each split count (one split: no reduce launch)."""
    from meshserve.kernels.triton_attention import _next_pow2

    return {_next_pow2(s) for s in counts if s > 1}


@needs_triton
@pytest.mark.parametrize("num_sms", [132, 16])
@pytest.mark.parametrize(("heads", "rank"), [(4, 32), (16, 512), (128, 512)])  # the tests' tiny, V2-Lite, V3
@pytest.mark.parametrize("legacy", [False, True])
def test_the_mixed_warm_up_reaches_every_mla_reduce_variant(monkeypatch, num_sms, heads, rank, legacy):
    from meshserve.kernels import triton_mla

    monkeypatch.setattr(triton_mla, "_num_sms", lambda index: num_sms)
    layer = _mla(heads, rank, mla_legacy=legacy)
    cpu = torch.device("cpu")
    picked = {layer.decode_splits(n, ctx, torch.bfloat16, cpu) for n in ROWS for ctx in CONTEXTS}
    picked.discard(0)  # the balanced kernel (64 rows on): no split kernel, no reduce
    planned = mixed_split_counts([layer])
    assert _pads(picked) <= _pads(planned)
    assert picked <= set(planned)  # the split kernel's one-split (direct) variant too
    if (heads, rank, num_sms, legacy) == (4, 32, 132, False):
        assert {2, 4} <= _pads(picked)  # what the H200 run met late (W2's 100-2,048-token contexts)


@needs_triton
@pytest.mark.parametrize("max_splits", [64, 16, 48])
def test_the_mixed_warm_up_reaches_every_triton_backend_reduce_variant(monkeypatch, max_splits):
    from meshserve.kernels import triton_attention
    from meshserve.kernels.triton_attention import TritonAttentionBackend

    monkeypatch.setattr(triton_attention, "_num_sms", lambda index: 132)
    backend = TritonAttentionBackend(max_decode_splits=max_splits)
    layer = type("Layer", (), {"backend": backend})()
    picked = {
        backend.decode_splits(n, kv_heads, head_dim, torch.bfloat16, ctx, torch.device("cpu"))
        for n in ROWS for kv_heads in (1, 8) for head_dim in (64, 256) for ctx in CONTEXTS
    }
    assert picked <= set(mixed_split_counts([layer]))


def test_forced_decode_splits_reach_mla_layers_that_split():
    a, b = _mla(4, 32), _mla(4, 32)
    torch_ref = MLAAttention(4, 16, 16, 16, 32, 0.25)  # PLAIN: the torch reference, no splits
    balanced = _mla(4, 32, mla_balanced=True)  # the balanced kernel at every batch size
    assert max_decode_splits([a, b, torch_ref, balanced]) == 64
    with forced_decode_splits([a, b, torch_ref, balanced], 8) as chosen:
        assert chosen == [a, b] and a.decode_num_splits == b.decode_num_splits == 8
        assert a.decode_splits(3, 20000, torch.bfloat16, torch.device("cpu")) == 8  # graphs key by it too
    assert a.decode_num_splits is None and b.decode_num_splits is None
    assert torch_ref.decode_num_splits is None and balanced.decode_num_splits is None
    assert mixed_split_counts([torch_ref, balanced]) == [0]  # the mixed step once, as it comes
    assert mixed_split_counts([a]) == [1, 2, 4, 8, 16, 32, 64]


@needs_triton
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_an_mla_layers_forced_count_reaches_its_decode_kernel(monkeypatch, splits):
    """The layer's absorbed path (Triton, the interpreter on CPU) launches the forced count and still gives
    the reference's output."""
    from meshserve.kernels import triton_mla
    from meshserve.kernels.attention_metadata import AttentionMetadata
    from meshserve.kernels.mla_ref import write_latent_ref

    heads, nope, rope, v_dim, rank, block_size = 4, 8, 8, 8, 32, 4
    seq_lens = [70, 9]
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    layer = _mla(heads, rank)
    layer.qk_nope_head_dim, layer.qk_rope_head_dim, layer.v_head_dim = nope, rope, v_dim
    layer.kv_cache = torch.zeros(1, 24, block_size, 1, rank + rope)
    tables = torch.tensor([list(range(18)), list(range(18, 21)) + [0] * 15])
    for b, n in enumerate(seq_lens):  # every context row written through the reference
        slots = torch.tensor([int(tables[b, p // block_size]) * block_size + p % block_size
                              for p in range(n)])
        write_latent_ref(rnd(n, rank), rnd(n, rope), layer.kv_cache, slots)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.int64),
                             query_start_loc=torch.tensor([0, 1, 2]), seq_lens=torch.tensor(seq_lens),
                             block_tables=tables, max_query_len=1, max_seq_len=max(seq_lens),
                             query_start_loc_cpu=[0, 1, 2], seq_lens_cpu=seq_lens)
    q_nope, q_pe = rnd(2, heads, nope), rnd(2, heads, rope)
    kv_b = rnd(heads * (nope + v_dim), rank) * rank**-0.5
    launched = []
    real = triton_mla.mla_decode

    def spy(*args, num_splits=None, **kwargs):
        launched.append(num_splits)
        return real(*args, num_splits=num_splits, **kwargs)

    monkeypatch.setattr(triton_mla, "mla_decode", spy)
    layer.decode_num_splits = splits
    with torch.inference_mode():
        got = layer._absorbed(q_nope, q_pe, kv_b, meta, triton=True)
        ref = layer._absorbed(q_nope, q_pe, kv_b, meta, triton=False)
    assert launched == [splits]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
