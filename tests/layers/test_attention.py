"""The attention layer's fused prologue over an fp8 cache (layers/attention.py): forward_qkv hands the layer's
k_scale / v_scale to the backend, so the cache holds what the unfused path (reference prologue) writes."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.quant_ref import FP8_DTYPE

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU runs tests/gpu)"),
]


def test_fused_prologue_writes_the_fp8_cache_with_the_layers_scales():
    from meshserve.kernels.triton_attention import TritonAttentionBackend
    from meshserve.kernels.triton_ops import qkv_rope_cache_ref
    from meshserve.layers.attention import Attention
    from meshserve.layers.rotary import RotaryEmbedding

    h, hkv, d, t, block = 4, 2, 16, 3, 4
    layer = Attention(h, d, hkv, d**-0.5)
    layer.backend, layer.fused_prologue = TritonAttentionBackend(), True
    layer.k_scale, layer.v_scale = 0.25, 1 / 512  # |v| ~ 1 / (1/512) saturates at 448
    layer.kv_cache = torch.zeros(2, 4, block, hkv, d).to(FP8_DTYPE)
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0, rope_scaling=None), d, 64)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g)
    positions = torch.tensor([3, 0, 5])
    slots = torch.tensor([3, 4, 9])
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                             seq_lens=torch.tensor([4, 1, 6], dtype=torch.int32),
                             block_tables=torch.tensor([[0, 0], [1, 0], [1, 2]], dtype=torch.int32),
                             max_query_len=1, max_seq_len=6, query_start_loc_cpu=[0, 1, 2, 3],
                             seq_lens_cpu=[4, 1, 6])
    assert layer.can_fuse_prologue
    layer.forward_qkv(qkv, positions, rope, None, None, meta)
    expect = torch.zeros_like(layer.kv_cache)
    qkv_rope_cache_ref(qkv, positions, rope.cos_cache, rope.sin_cache, None, None, 0.0, expect, slots, h, hkv,
                       0.25, 1 / 512)
    got, ref = layer.kv_cache.float(), expect.float()
    # one e4m3 step at most (the interpreter's fp8 cast lands a binade low where the reference rounded up to
    # a power of two); unscaled K would be 4x off, unscaled V ~512x
    assert ((got - ref).abs() <= ref.abs() / 2).all() and (got == ref).float().mean() > 0.9
    assert got[1].abs().max() == 448


def _decode_layer_case(dtype=torch.float32):
    """A Qwen3-style layer (q/k norm, GQA 2) bound to the Triton backend with two KV splits, and a decode-only
    step of three sequences (contexts 9, 1 and 20, block size 4) plus a CUDA-graph padding row."""
    from meshserve.kernels.triton_attention import TritonAttentionBackend
    from meshserve.layers.attention import Attention
    from meshserve.layers.norm import RMSNorm
    from meshserve.layers.rotary import RotaryEmbedding

    h, hkv, d, block = 4, 2, 16, 4
    layer = Attention(h, d, hkv, d**-0.5)
    layer.backend, layer.fused_prologue = TritonAttentionBackend(decode_num_splits=2), True
    g = torch.Generator().manual_seed(1)
    layer.kv_cache = torch.randn(2, 12, block, hkv, d, generator=g).to(dtype)
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0, rope_scaling=None), d, 64)
    q_norm, k_norm = RMSNorm(d, 1e-6), RMSNorm(d, 1e-6)
    with torch.no_grad():
        q_norm.weight.copy_(1 + 0.2 * torch.randn(d, generator=g))
        k_norm.weight.copy_(1 + 0.2 * torch.randn(d, generator=g))
    q_norm, k_norm = q_norm.to(dtype), k_norm.to(dtype)
    seq_lens = [9, 1, 20, 0]
    tables = torch.tensor([[4, 7, 2, 0, 0], [9, 0, 0, 0, 0], [1, 3, 5, 8, 10], [0, 0, 0, 0, 0]], dtype=torch.int32)
    slots = torch.tensor([int(tables[i, (n - 1) // block]) * block + (n - 1) % block if n else -1
                          for i, n in enumerate(seq_lens)])
    positions = torch.tensor([max(0, n - 1) for n in seq_lens])
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(5, dtype=torch.int32),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
                             max_query_len=1, max_seq_len=20, query_start_loc_cpu=list(range(5)),
                             seq_lens_cpu=seq_lens)
    qkv = torch.randn(4, (h + 2 * hkv) * d, generator=g).to(dtype)
    return layer, qkv, positions, rope, q_norm, k_norm, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_fused_prologue_gives_the_two_step_output_and_cache(dtype):
    """MESHSERVE_DECODE_FUSED_PROLOGUE's path of forward_qkv (the backend's attend_qkv, one launch) leaves the
    same cache bytes and returns the same attention output as write_qkv + attend; the disaggregation hook runs
    once either way, after the K/V are in the cache."""
    layer, qkv, positions, rope, q_norm, k_norm, meta = _decode_layer_case(dtype)
    before = layer.kv_cache.clone()
    outs, caches = [], []
    for fused in (False, True):
        layer.kv_cache = before.clone()
        layer.decode_fused_prologue = fused
        calls = []
        layer.after_kv_write = lambda calls=calls: calls.append(layer.kv_cache.clone())
        assert layer._fuses_decode_prologue(meta, qkv.dtype) == fused
        outs.append(layer.forward_qkv(qkv, positions, rope, q_norm, k_norm, meta))
        caches.append(layer.kv_cache)
        assert len(calls) == 1 and torch.equal(calls[0], layer.kv_cache)
    assert not torch.equal(caches[0], before)  # the step wrote its K/V
    assert torch.equal(caches[1].view(torch.uint8), caches[0].view(torch.uint8))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=tol, rtol=tol)


def test_decode_fused_prologue_only_in_decode_only_steps():
    """A step with a prompt chunk, a captured mixed step and a backend without attend_qkv take the two-step
    path with the switch on."""
    import dataclasses

    from meshserve.layers.attention import TorchAttentionBackend

    layer, _, _, _, _, _, meta = _decode_layer_case()
    layer.decode_fused_prologue = True
    assert layer._fuses_decode_prologue(meta, torch.float32)
    assert not layer._fuses_decode_prologue(dataclasses.replace(meta, max_query_len=3), torch.float32)
    assert not layer._fuses_decode_prologue(dataclasses.replace(meta, graph_bound=True), torch.float32)
    layer.backend = TorchAttentionBackend()
    assert not layer._fuses_decode_prologue(meta, torch.float32)


def test_decode_fused_prologue_split_rule():
    """MESHSERVE_DECODE_FUSED_PROLOGUE=split (decode_fused_min_splits 2): only launches with more than one KV
    split fuse, by the backend's own split count for the step's batch and max_seq_len (what a graph bakes in);
    the default (1) fuses every decode-only step."""
    import dataclasses

    layer, qkv, positions, rope, q_norm, k_norm, meta = _decode_layer_case()
    layer.decode_fused_prologue = True
    backend = layer.backend
    backend.decode_num_splits = 1
    assert layer._fuses_decode_prologue(meta, qkv.dtype)  # min 1: always
    layer.decode_fused_min_splits = 2
    assert not layer._fuses_decode_prologue(meta, qkv.dtype)
    calls = []
    backend.attend_qkv = lambda *a, **k: calls.append(1)
    layer.forward_qkv(qkv, positions, rope, q_norm, k_norm, meta)  # the two-step path
    assert not calls
    del backend.attend_qkv
    backend.decode_num_splits = 2
    assert layer._fuses_decode_prologue(meta, qkv.dtype)
    # the rule by context: the split heuristic gives one batch row and a KV head at most 2 * SMs programs
    backend.decode_num_splits = None
    one = dataclasses.replace(meta, seq_lens=meta.seq_lens[:1], max_seq_len=256)
    long = dataclasses.replace(one, max_seq_len=4096)
    assert backend.decode_splits(1, 2, 16, qkv.dtype, 256, qkv.device) == 1
    assert backend.decode_splits(1, 2, 16, qkv.dtype, 4096, qkv.device) > 1
    assert not layer._fuses_decode_prologue(one, qkv.dtype)
    assert layer._fuses_decode_prologue(long, qkv.dtype)


def test_decode_fused_prologue_keeps_a_real_engines_greedy_tokens(tmp_path, monkeypatch):
    """A tiny Qwen3 (q/k norms, GQA 2, head_dim 24) served on the Triton backend in the interpreter, the fused
    prologue on (the selection turns it on on a GPU only), two KV splits: greedy tokens with decode steps
    through attend_qkv equal those through write_qkv + attend, for a batch and for each prompt alone."""
    from meshserve import LLM, SamplingParams
    from tests.conftest import make_tiny_checkpoint

    monkeypatch.setenv("MESHSERVE_ATTENTION_BACKEND", "triton")
    # one layer: every attention kernel runs in the interpreter, so the suite's two-layer model took twice as long
    model = make_tiny_checkpoint(str(tmp_path / "qwen3"), "qwen3", num_hidden_layers=1)
    llm = LLM(model=model, block_size=4, max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=32, enable_prefix_caching=False, num_gpu_blocks_override=64, seed=0)
    try:
        layers = llm.engine.runner.model.attention_layers()
        backend = layers[0].backend
        backend.decode_num_splits = 2
        calls = []
        real = backend.attend_qkv
        monkeypatch.setattr(backend, "attend_qkv", lambda *a, **k: calls.append(1) or real(*a, **k))
        prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": list(range(20, 33))}]
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        runs = {}
        for fused in (False, True):
            for layer in layers:
                layer.fused_prologue, layer.decode_fused_prologue = True, fused
            batch = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
            runs[fused] = (batch, alone, len(calls))
    finally:
        llm.shutdown()
    assert runs[False][2] == 0 and runs[True][2] > 0  # decode steps went through attend_qkv with the switch only
    assert runs[True][:2] == runs[False][:2]
