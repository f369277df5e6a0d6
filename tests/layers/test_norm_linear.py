"""norm_linear: where the RMSNorm folds into the next projection's GEMV; the model's tokens stay the same.

On a GPU the fold needs a single 16-bit row (gemv_for). On CPU gemv_for never serves, so the plain path runs;
the tests below check that, then stand in a CPU gemv_for (single rows of any dtype, the real Triton kernel in
the interpreter) to drive the fused path through the layers and a whole engine in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from types import SimpleNamespace

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run only without CUDA"),
]

from transformers import AutoConfig

from meshserve import LLM, SamplingParams
from meshserve.layers import norm_linear as norm_linear_module
from meshserve.layers.backend_selection import PLAIN, KernelSelection
from meshserve.layers.linear import ColumnParallelLinear, RowParallelLinear
from meshserve.layers.norm import RMSNorm
from meshserve.layers.norm_linear import norm_linear
from meshserve.models.llama import LlamaDecoderLayer
from meshserve.models.moe import Qwen3MoeForCausalLM
from tests.conftest import VOCAB

FOLD = KernelSelection(gemv=True, fused_ops=True, norm_gemv=True)


class CountingGemv:
    """A gemv_for for CPU tests: the Triton module's rms_norm_gemv (interpreter; 128-row programs keep it
    fast) for single rows of any dtype, counting the calls; None for several rows, as on a GPU."""

    def __init__(self):
        from meshserve.kernels import triton_gemv

        self.calls = 0
        self.module = SimpleNamespace(
            rms_norm_gemv=self._count(functools.partial(triton_gemv.rms_norm_gemv, block_n=128))
        )

    def _count(self, fn):
        def call(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        return call

    def __call__(self, x, weight, enabled):
        return self.module if enabled and x.numel() == x.shape[-1] else None


def _norm_and_linear(hidden=64, out=40, seed=0):
    torch.manual_seed(seed)
    norm, linear = RMSNorm(hidden, eps=1e-5), ColumnParallelLinear(hidden, out, bias=True)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        linear.weight.normal_(0.0, 0.1)
        linear.bias.normal_()
    return norm, linear


def test_cpu_keeps_the_two_kernel_path():
    # the switch on, one row: still None on CPU (gemv_for serves GPU tensors only), so RMSNorm + F.linear run
    norm, linear = _norm_and_linear()
    linear.kernels = FOLD
    x = torch.randn(1, 64)
    assert norm_linear(norm, linear, x, torch.randn(1, 64)) is None
    assert norm_linear(norm, linear, x.bfloat16(), None) is None


@pytest.mark.parametrize("with_residual", [True, False])
def test_fused_matches_norm_then_linear(monkeypatch, with_residual):
    fake = CountingGemv()
    monkeypatch.setattr(norm_linear_module, "gemv_for", fake)
    norm, linear = _norm_and_linear()
    linear.kernels = FOLD
    x, residual = 3 * torch.randn(1, 64), (torch.randn(1, 64) if with_residual else None)
    y, new_residual = norm_linear(norm, linear, x, residual)
    assert fake.calls == 1
    normed, expected_residual = norm(x, residual) if with_residual else (norm(x), x)
    assert torch.equal(new_residual, expected_residual)
    torch.testing.assert_close(y, linear(normed), rtol=1e-5, atol=1e-5)


def test_where_the_fold_does_not_apply(monkeypatch):
    fake = CountingGemv()
    monkeypatch.setattr(norm_linear_module, "gemv_for", fake)
    norm, linear = _norm_and_linear()
    x, residual = torch.randn(1, 64), torch.randn(1, 64)
    assert norm_linear(norm, linear, x, residual) is None  # unbound layer: the plain selection
    linear.kernels = dataclasses.replace(FOLD, norm_gemv=False)
    assert norm_linear(norm, linear, x, residual) is None  # the switch off
    linear.kernels = FOLD
    assert norm_linear(norm, linear, torch.randn(3, 64), torch.randn(3, 64)) is None  # several rows
    assert norm_linear(norm, linear, x, residual.double()) is None  # dtypes differ: rms_norm would promote
    row = RowParallelLinear(64, 40)  # its input is split across ranks, never the whole normed row
    row.kernels = FOLD
    assert norm_linear(norm, row, x, residual) is None
    assert fake.calls == 0


def _hf_config(model_type, **extra):
    return AutoConfig.for_model(
        model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        **extra,
    )


def test_layers_fold_only_their_own_projections():
    dense = LlamaDecoderLayer(_hf_config("llama"), rotary_emb=None)
    assert dense.folds_attn_norm and dense.folds_mlp_norm
    # Qwen3-MoE with layer 1 dense: the sparse block has no gate_up of ours; attention still folds
    moe = Qwen3MoeForCausalLM(
        _hf_config(
            "qwen3_moe",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        )
    )
    layers = moe.model.layers
    assert [layer.folds_mlp_norm for layer in layers] == [False, True]
    assert all(layer.folds_attn_norm for layer in layers)
    # the fold holds no second reference to the projections (they load and bind once)
    names = [n for n, _ in dense.named_modules()]
    assert names.count("self_attn.qkv_proj") == 1 and not any("fold" in n for n in names)


def _tokens_plain_and_switched(monkeypatch, path, module_attr, fake, **switches):
    """Greedy tokens of a tiny checkpoint (9 prompt tokens, 6 new: 5 batch-1 decode steps) with the plain kernel
    selection, then with `switches` on and norm_linear's `module_attr` (a *_for lookup) replaced by `fake`."""
    prompt = [(7 * i + 3) % VOCAB for i in range(9)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def tokens():
        out = LLM(model=path).generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return out[0].outputs[0].token_ids

    plain = tokens()
    monkeypatch.setattr(norm_linear_module, module_attr, fake)
    from meshserve.engine import model_runner

    select = model_runner.select_kernels
    monkeypatch.setattr(model_runner, "select_kernels", lambda config: dataclasses.replace(select(config), **switches))
    return plain, tokens()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_tokens_unchanged_with_the_fold(monkeypatch, family, tiny_model_dir):
    fake = CountingGemv()
    plain, switched = _tokens_plain_and_switched(monkeypatch, tiny_model_dir(family), "gemv_for", fake,
                                                 norm_gemv=True)
    assert switched == plain
    # 5 decode steps at batch 1 (the prefill gives the first token): 2 layers x (QKV + gate_up) each
    assert fake.calls == 5 * 2 * 2
    assert PLAIN.norm_gemv is False


class CountingActGemv(CountingGemv):
    """CountingGemv that also serves the plain GEMV (quantization.base's gemv_for: a gate/up projection's
    act_out) and counts the calls that asked for SiLU-and-mul in the epilogue."""

    def __init__(self):
        from meshserve.kernels import triton_gemv

        super().__init__()
        self.act_outs = 0
        norm_gemv = self.module.rms_norm_gemv

        def counted(fn):
            def call(*args, **kwargs):
                self.act_outs += bool(kwargs.get("act_out"))
                return fn(*args, **kwargs)

            return call

        gemv = counted(self._count(triton_gemv.gemv))
        self.module = SimpleNamespace(rms_norm_gemv=counted(norm_gemv), gemv=gemv)


@pytest.mark.parametrize("norm_gemv", [False, True])
def test_greedy_tokens_unchanged_with_act_out(monkeypatch, norm_gemv, tiny_model_dir):
    # the gate/up GEMV's SiLU-and-mul epilogue (MESHSERVE_GEMV_ACT_OUT) through the layers in fp32: alone
    # (MergedColumnParallelLinear.act_forward) and with the norm inside the GEMV (norm_linear's act_out)
    from meshserve.layers.quantization import base as quant_base

    fake = CountingActGemv()
    monkeypatch.setattr(quant_base, "gemv_for", fake)
    plain, switched = _tokens_plain_and_switched(monkeypatch, tiny_model_dir("llama"), "gemv_for", fake,
                                                 gemv=True, norm_gemv=norm_gemv, gemv_act_out=True)
    assert switched == plain
    # 5 batch-1 decode steps x 2 layers: each gate/up once with act_out (and the QKV's norm with norm_gemv)
    assert fake.act_outs == 5 * 2
    assert fake.calls == 5 * 2 * (2 if norm_gemv else 1)


class CountingRowGemv(CountingGemv):
    """A norm_row_gemv_for for CPU tests: the one-launch kernel (interpreter, 128-row programs) for single rows,
    counting the calls and how many asked for the normed row (an MoE router's)."""

    def __init__(self):
        from meshserve.kernels import triton_norm_row_gemv

        self.calls = self.routed = 0
        run = functools.partial(triton_norm_row_gemv.norm_row_gemv, block_n=128)

        def call(*args, **kwargs):
            self.calls += 1
            self.routed += bool(kwargs.get("normed_out"))
            return run(*args, **kwargs)

        self.module = SimpleNamespace(norm_row_gemv=call)

    def __call__(self, x, weight, enabled):
        return self.module if enabled and x.numel() == x.shape[-1] and weight.shape[1] <= 2048 else None


ROW = KernelSelection(gemv=True, fused_ops=True, norm_row_gemv=True)


@pytest.mark.parametrize("with_residual", [True, False])
def test_one_launch_matches_norm_then_linear(monkeypatch, with_residual):
    fake = CountingRowGemv()
    monkeypatch.setattr(norm_linear_module, "norm_row_gemv_for", fake)
    norm, linear = _norm_and_linear()
    linear.kernels = ROW  # norm_gemv off: the one-launch switch alone serves
    x, residual = 3 * torch.randn(1, 64), (torch.randn(1, 64) if with_residual else None)
    y, new_residual = norm_linear(norm, linear, x, residual)
    assert fake.calls == 1 and fake.routed == 0
    normed, expected_residual = norm(x, residual) if with_residual else (norm(x), x)
    assert torch.equal(new_residual, expected_residual)
    torch.testing.assert_close(y, linear(normed), rtol=1e-5, atol=1e-5)
    # the router form: the normed row comes back too
    from meshserve.layers.linear import ReplicatedLinear

    router = ReplicatedLinear(64, 8, bias=False)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.1)
    router.kernels = ROW
    logits, h, normed_row = norm_linear_module.norm_route(norm, router, x, residual)
    assert fake.routed == 1 and torch.equal(h, expected_residual)
    torch.testing.assert_close(normed_row, normed, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, router(normed), rtol=1e-5, atol=1e-5)
    router.kernels = dataclasses.replace(ROW, norm_row_gemv=False)
    assert norm_linear_module.norm_route(norm, router, x, residual) is None
    # a projection whose input is wider than the norm's row (EAGLE-3's concatenation): the plain path
    wide = ColumnParallelLinear(128, 40)
    wide.kernels = ROW
    assert norm_linear(norm, wide, torch.randn(1, 128), None) is None
    assert fake.calls == 2


def test_moe_tokens_unchanged_with_one_launch_norms(monkeypatch, tiny_model_dir):
    """A tiny Qwen3-MoE with MESHSERVE_NORM_ROW_GEMV's wiring: the QKV's norm and the router's (which hands its
    normed row to the experts) each one launch at batch 1, the greedy tokens those of the plain path."""
    path = tiny_model_dir("qwen3_moe")
    fake = CountingRowGemv()
    plain, switched = _tokens_plain_and_switched(monkeypatch, path, "norm_row_gemv_for", fake, norm_row_gemv=True)
    assert switched == plain
    # 5 decode steps at batch 1: per layer the QKV's norm and the router's (a sparse layer) or the gate_up's
    # (the tiny model's dense layer 1)
    from meshserve.models.moe_config import is_sparse_layer

    config = AutoConfig.from_pretrained(path)
    sparse = sum(is_sparse_layer(config, i) for i in range(config.num_hidden_layers))
    assert 0 < sparse < config.num_hidden_layers
    assert fake.calls == 5 * 2 * config.num_hidden_layers
    assert fake.routed == 5 * sparse
    assert PLAIN.norm_row_gemv is False
