"""layers/norm_fold.py: both residual RMSNorms folded into the GEMVs around them equal the plain layers.

On CPU fold_ops_for never serves (the fold is a GPU path), so the tests stand in a CPU module: the torch
reference (kernels/norm_fold_ref.py, the same fixed-point sum) or the Triton kernel in the interpreter, and
drive the folded layers, then a whole engine, against the plain path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from meshserve import LLM, SamplingParams
from meshserve.kernels.norm_fold_ref import fold_gemv_ref
from meshserve.layers import norm_fold as norm_fold_module
from meshserve.layers.backend_selection import PLAIN, KernelSelection
from meshserve.layers.norm import RMSNorm
from meshserve.layers.norm_fold import NormFold
from meshserve.models.llama import LlamaDecoderLayer
from tests.conftest import VOCAB

FOLD = KernelSelection(norm_fold=True)
REF = SimpleNamespace(fold_gemv=fold_gemv_ref)


def _hf_config(layers=2):
    return AutoConfig.for_model(
        "llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
    )


def _layers(dtype, n=3, seed=0):
    """n decoder layers with random weights, attention replaced by a fixed map of the QKV row (the same in
    both paths: what is under test is the norms and projections around it), and the final norm."""
    torch.manual_seed(seed)
    layers = [LlamaDecoderLayer(_hf_config(), rotary_emb=None) for _ in range(n)]
    final = RMSNorm(32, eps=1e-5)
    for module in [*layers, final]:
        for name, p in module.named_parameters():
            with torch.no_grad():
                p.copy_(
                    1 + 0.2 * torch.randn_like(p)
                    if "norm" in name or module is final
                    else 0.2 * torch.randn_like(p)
                )
        module.to(dtype)
    for layer in layers:
        layer.self_attn.attend = lambda positions, qkv, meta: 0.5 * qkv[..., :32]
    return layers, final


def _plain(layers, final, x):
    hidden, residual = x, None
    for layer in layers:
        hidden, residual = layer(None, hidden, residual, None)
    return final(hidden, residual)  # (normed, the whole residual stream)


def _folded(layers, final, x, ops):
    fold = NormFold(ops, 2 * len(layers), x.device)
    hidden = x
    for layer in layers:
        hidden, residual = layer(None, hidden, None, None, fold)
        assert residual is None
    assert fold.filled == 2 * len(layers) and bool((fold.sums[:, 0] > 0).all())
    return final(hidden), hidden


def _interpreter_ops():
    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        pytest.skip("the Triton interpreter runs here only without CUDA")
    from meshserve.kernels import triton_norm_fold

    return triton_norm_fold


@pytest.mark.parametrize("ops_name", ["ref", "triton-interpreter"])
@pytest.mark.parametrize("gated", [True, False])
def test_folded_layers_equal_plain_layers_fp32(monkeypatch, ops_name, gated):
    ops = REF if ops_name == "ref" else _interpreter_ops()
    if not gated:  # the large-MLP branch: SiLU-and-mul as its own kernel, then the producer GEMV
        monkeypatch.setattr(norm_fold_module, "_MAX_FUSED_GATED_K", 0)
    layers, final = _layers(torch.float32)
    x = torch.randn(1, 32)
    want, want_stream = _plain(layers, final, x)
    got, stream = _folded(layers, final, x, ops)
    # fp32: the plain path's mean of squares vs the fixed-point sum (6e-8 a program), fp32 sums in another
    # order (the interpreter's projections too), carried through three layers: a few ulps of the largest value
    for a, b in ((stream, want_stream), (got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_folded_layers_within_bf16_tolerance():
    layers, final = _layers(torch.bfloat16)
    x = torch.randn(1, 32).bfloat16()
    want, want_stream = _plain(layers, final, x)
    got, stream = _folded(layers, final, x, REF)
    # the same roundings at every step; a last-bit difference in a statistic may move a bf16 value by an ulp
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(
        stream.float(), want_stream.float(), rtol=4 * eps, atol=4 * eps * want_stream.abs().max().item()
    )
    torch.testing.assert_close(
        got.float(), want.float(), rtol=4 * eps, atol=4 * eps * want.abs().max().item()
    )


def test_begin_only_where_the_fold_applies(monkeypatch):
    layers, _ = _layers(torch.float32, n=2)
    x = torch.randn(1, 32)
    assert NormFold.begin(x, layers) is None  # unbound: the plain selection
    for layer in layers:
        for module in layer.modules():
            if hasattr(module, "kernels"):
                module.kernels = FOLD
    assert NormFold.begin(x, layers) is None  # CPU: no GPU module serves
    monkeypatch.setattr(
        norm_fold_module, "fold_ops_for", lambda x, on: REF if on and x.numel() == 32 else None
    )
    fold = NormFold.begin(x, layers)
    assert fold is not None and fold.sums.tolist() == [[0, 0]] * 4 and fold.sums.dtype == torch.int64
    assert NormFold.begin(torch.randn(2, 32), layers) is None  # several rows
    assert NormFold.begin(x.double(), layers) is None  # weights of another dtype
    monkeypatch.setattr(norm_fold_module, "get_tp_size", lambda: 2)
    assert NormFold.begin(x, layers) is None  # row-parallel o_proj / down_proj: the all-reduce sits between
    monkeypatch.setattr(norm_fold_module, "get_tp_size", lambda: 1)
    layers[1].folds_mlp_norm = False  # a layer whose MLP is not ours (MoE)
    assert NormFold.begin(x, layers) is None
    layers[1].folds_mlp_norm = True
    layers[1].mlp.down_proj.quant_method = SimpleNamespace()  # quantized: no epilogue in those GEMVs yet
    assert layers[1].mlp.down_proj.quantized and NormFold.begin(x, layers) is None
    assert PLAIN.norm_fold is False


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3_moe"])
def test_greedy_tokens_unchanged_with_the_fold(monkeypatch, tiny_model_dir, family):
    # qwen2: QKV bias, a tied LM head; qwen3_moe: a sparse MLP in layer 0, so the fold never begins
    path = tiny_model_dir(family)
    prompt = [(5 * i + 1) % VOCAB for i in range(7)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def tokens():
        out = LLM(model=path).generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return out[0].outputs[0].token_ids

    plain = tokens()
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("residual") is not None)
        return fold_gemv_ref(*args, **kwargs)

    ops = SimpleNamespace(fold_gemv=counting)
    monkeypatch.setattr(
        norm_fold_module, "fold_ops_for", lambda x, on: ops if on and x.shape[0] == 1 else None
    )
    from meshserve.engine import model_runner

    select = model_runner.select_kernels
    monkeypatch.setattr(
        model_runner, "select_kernels", lambda config: dataclasses.replace(select(config), norm_fold=True)
    )
    assert tokens() == plain
    # 5 batch-1 decode steps (the prefill is 7 rows): per step 2 layers x 2 producers, and 3 consumers (the
    # first layer's QKV takes the embedding through the plain norm)
    folds = family != "qwen3_moe"
    assert calls.count(True) == 5 * 4 * folds and calls.count(False) == 5 * 3 * folds
