"""FP8 (e4m3) fixtures the kernel, layer and checkpoint tests share: fp8 KV caches, values exact in e4m3, the
formats' rounding written out for the oracles, and tiny block-fp8 checkpoints beside their dequantized twins."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from meshserve.kernels.quant_ref import FP8_DTYPE, fp8_linear_ref, quantize_activation

E4M3_MAX = 448.0
BLOCK = 128  # the block-fp8 format's weight block and activation group
# a tiny DeepSeek-V3 for block-fp8 checkpoints: MLA projections of several 128 x 128 blocks each (kv_b_proj
# 256 x 160), 8 routed experts of whole blocks; each test adds first_k_dense_replace (which layers are dense)
DEEPSEEK_V3_BLOCK_FP8 = {
    "model_type": "deepseek_v3",
    "hidden_size": 256,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 160,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
}


# How far an fp8 GEMM on the GPU (torch._scaled_mm at these row counts) may sit from fp8_linear_ref's exact fp32
# sum, in units of the root sum of squares of each output's scaled products (the scale its rounding errors grow
# with). Measured on an H100 (2026-12-05), the worst output of each test case was 0.04-0.07 of it (K 576-14,336:
# 0.022-0.096 absolute), ~0.05 x the output's spread, so the bound is twice that: a wrong scale, row or
# index errs by the output itself. An absolute bound (0.03 + 2%) failed at large K, one proportional to the
# products' magnitudes at small K. More than Hopper's reduced-precision fp8 accumulation explains at small K
# (BENCHMARKS.md, forty-ninth session: open question); the Triton fp8 GEMMs' own tests bound them by one bf16
# rounding of the exact sum.
FP8_GEMM_SPREAD = 0.15


def assert_fp8_linear_close(out: torch.Tensor, x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                            input_scale: torch.Tensor | None = None) -> None:
    """out (an fp8 GEMM of x and the per-channel fp8 weight wq, ws) against fp8_linear_ref: within
    FP8_GEMM_SPREAD of the root sum of squares of each output's scaled products."""
    ref = fp8_linear_ref(x, wq, ws, input_scale).float()
    xq, xs = quantize_activation(x.reshape(-1, x.shape[-1]), input_scale)
    spread = (xq.float().square() @ wq.float().square().t()).sqrt() * xs * ws.float()[None, :]
    bound = FP8_GEMM_SPREAD * spread
    err = (out.float().reshape(ref.shape) - ref).abs()
    worst = int((err / bound).argmax())
    assert bool((err <= bound).all()), (
        f"{int((err > bound).sum())} of {err.numel()} outputs past the bound; worst at {worst}: "
        f"|{float(out.flatten()[worst]):.4g} - {float(ref.flatten()[worst]):.4g}| > {float(bound.flatten()[worst]):.3g}")


def fp8_kv_cache(cache: torch.Tensor, scale: float) -> torch.Tensor:
    """A paged KV cache as the fp8 cache holds it: cache / scale in e4m3, saturated at +-448 as the cache writers
    do (reads multiply scale back). torch's CUDA cast turns values past 448 into NaN where its CPU cast saturates:
    a W2-sized random cache at scale 0.01 has ~1,500 of them."""
    return (cache.float() / scale).clamp(-448.0, 448.0).to(FP8_DTYPE)


def e4m3_exact(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x rounded to e4m3, times scale: values whose division by scale is exact in e4m3, so a kernel's fp32 ->
    fp8 cast has nothing to round (the Triton interpreter's cast mis-rounds values that round up across a
    power of two: a binade low)."""
    return x.to(FP8_DTYPE).float() * scale


def fake_quant_fp8(x: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """x through e4m3 and back as the fp8 formats round it: each row (last dim), or each group of group_size
    features of a row, scaled so its absmax is 448, cast (saturating), scaled back. Rows are online fp8's
    per-token activations and per-channel weights; groups of 128 are block fp8's activations."""
    shape, k = x.shape, x.shape[-1]
    step = group_size or k
    x2 = x.reshape(-1, k).float()
    out = torch.empty_like(x2)
    for lo in range(0, k, step):
        g = x2[:, lo : lo + step]
        s = (g.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
        out[:, lo : lo + step] = (g / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).float() * s
    return out.reshape(shape).to(x.dtype)


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """w[n, k] = w_fp8[n, k] * scale_inv[n // 128, k // 128], in numpy (independent of the project's code)."""
    w = weight.float().numpy()
    s = scale_inv.numpy()
    n, k = w.shape
    return torch.from_numpy(w * np.repeat(np.repeat(s, BLOCK, axis=0), BLOCK, axis=1)[:n, :k])


def save_plain_copy(src: str, dst: str, tensors: dict[str, torch.Tensor]) -> str:
    """dst: tensors as a plain checkpoint with src's config, less its quantization_config."""
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def dequantized_block_fp8_copy(src: str, dst: str) -> str:
    """The block-fp8 checkpoint src as a plain fp32 one."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        out[name] = dequantize_block_fp8(t, scale) if scale is not None else t.float()
    return save_plain_copy(src, dst, out)


def write_bf16_checkpoint(path: str, fields: dict) -> str:
    """A tiny random 2-layer bf16 checkpoint of config fields (model_type among them) with a trained tokenizer
    (seed 0). MoE routers with a score-correction bias get a random one, so that routing is not a near-tie
    everywhere."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import VOCAB, _train_tokenizer

    fields = dict(fields)
    config = AutoConfig.for_model(
        fields.pop("model_type"),
        vocab_size=VOCAB,
        num_hidden_layers=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=2,
        **fields,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.1)
    model.to(torch.bfloat16).save_pretrained(path)
    _train_tokenizer(VOCAB).save_pretrained(path)
    return path


def block_fp8_checkpoints(tmp_path_factory, families: dict[str, dict], prefix: str) -> Callable[[str], tuple]:
    """For a module-scoped fixture: family -> (block-fp8 folder, its dequantized fp32 folder, the bf16 source
    of families[family]'s config fields), each family built once."""
    from meshserve.models.quantize_checkpoint import quantize_checkpoint

    cache = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(f"{prefix}-{family}")
            src = write_bf16_checkpoint(str(root / "bf16"), families[family])
            qdir = quantize_checkpoint(src, str(root / "fp8"), "fp8_block")
            cache[family] = (qdir, dequantized_block_fp8_copy(qdir, str(root / "dequantized")), src)
        return cache[family]

    return get


FOLDED_PARTS = ("input_layernorm", "post_attention_layernorm", "q_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def check_fold_keeps_function(src: str, tensors: dict[str, torch.Tensor], folded: dict[str, torch.Tensor],
                              dst: str, hf_model: Callable, ids: list[list[int]]) -> str:
    """A scale fold (AWQ, SmoothQuant) touched every norm and projection it should (FOLDED_PARTS) and the folded
    copy, written to dst, computes the same fp32 logits as src; returns dst."""
    changed = [n for n in tensors if not torch.equal(tensors[n], folded[n])]
    for part in FOLDED_PARTS:
        assert any(part in n for n in changed), part
    save_plain_copy(src, dst, folded)
    x = torch.tensor(ids)
    with torch.no_grad():
        before, after = hf_model(src)(x).logits, hf_model(dst)(x).logits
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-5)
    return dst
