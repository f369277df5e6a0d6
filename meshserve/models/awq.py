"""AWQ (Lin et al., 2023) for meshserve's quantizer: activation-aware per-input-channel scales folded into the
layer before each projection, then a per-group clipping search, so round-to-nearest INT4 loses less where
the activations are loud.

As AutoAWQ does for Llama-style decoders, per layer:
  q/k/v      scaled by s, input_layernorm's weight divided by s
  o          scaled by s, v_proj's output rows divided by s; with grouped-query attention (v has fewer output
             rows than o has inputs) one scale per v row is shared by every query head reading that kv head
             (AutoAWQ skips o under GQA; the tied scale keeps the fold exact)
  gate/up    scaled by s, post_attention_layernorm's weight divided by s
  down       scaled by s, up_proj's output rows divided by s (silu(gate) * up is linear in up)
Every fold leaves the fp32 function unchanged; only the rounding sees the scales. s = mean|x|^alpha (or
AutoAWQ's "duo" form mean|x|^alpha / mean|w_normalised|^(1 - alpha)), normalised to a geometric mean of one,
alpha from a grid of 20. Then v/o/gate/up/down (not q/k, whose error the softmax reshapes) get a per
(output row, group) clip of max|w| from {1, 0.95, ..., 0.55} x max|w|.

The loss both searches minimise is the projections' output error on the calibration inputs, sum over tokens
of |x (W_q - W)^T|^2, each group's part dW_g B_g dW_g^T with B_g the group's diagonal block of the input's
Gram matrix X^T X (calibration.py), not AutoAWQ's re-run of the whole attention / MLP block per grid point:
GPTQ's objective without the cross-group terms (independent roundings cancel there), cheap enough for a CPU.
"""

from __future__ import annotations

import torch

from meshserve.kernels.quant_ref import quantize_int4_groups

N_GRID = 20
MAX_SHRINK = 0.5


def fake_int4(weight: torch.Tensor, group_size: int, min_zero: int = 0) -> torch.Tensor:
    """weight [N, K] rounded to asymmetric INT4 groups (quantize_int4_groups) and back, in fp32."""
    q, scales, zeros = quantize_int4_groups(weight.float(), group_size, min_zero)
    k = weight.shape[1]
    g = torch.arange(k) // group_size
    return ((q.float() - zeros[g]) * scales[g]).t()


def group_errors(dw: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[N, K / G]: dw_g B_g dw_g^T per row and group g of dw [N, K], with the Gram blocks B [K / G, G, G]."""
    groups, size = blocks.shape[0], blocks.shape[1]
    d = dw.to(blocks.dtype).view(dw.shape[0], groups, size)
    return torch.einsum("ngi,gij,ngj->ng", d, blocks, d)


def output_error(dw: torch.Tensor, blocks: torch.Tensor) -> float:
    """sum over tokens of |x dw^T|^2, each group's own part (the Gram matrix's diagonal blocks: rounding
    errors of different groups are independent, so the blocks hold what one group's rounding costs)."""
    return float(group_errors(dw, blocks).sum())


def _candidates(x_mean: torch.Tensor, weights: list[torch.Tensor], group_size: int, duo: bool):
    """AutoAWQ's scale grid: (alpha, s) for alpha in 0, 0.05, ..., 0.95."""
    x_mean = x_mean.float().clamp(min=1e-8)
    if duo:
        w = torch.cat([wi.float() for wi in weights], dim=0)
        wg = w.abs().view(w.shape[0], -1, group_size)
        w_mean = (wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)).view_as(w).mean(dim=0)
    for i in range(N_GRID):
        alpha = i / N_GRID
        s = x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4) if duo else x_mean.pow(alpha)
        s = s.clamp(min=1e-4)
        yield alpha, s / (s.max() * s.min()).sqrt()


def search_scale(
    weights: list[torch.Tensor],
    x_mean: torch.Tensor,
    blocks: torch.Tensor,
    group_size: int,
    min_zero: int = 0,
    expand=None,
) -> tuple[torch.Tensor, dict]:
    """The per-input-channel scale s [K'] minimising the summed output error of weights (all [*, K], one
    input) rounded as fake_int4(w * s) / s. expand maps a scale [K'] to the K input features (GQA's tied o
    scale); x_mean is then already [K']. Returns (s, {"alpha", "duo", "error", "rtn_error"})."""
    expand = expand or (lambda s: s)
    blocks = blocks.float()

    def error(s_full):
        rounded = [fake_int4(w * s_full, group_size, min_zero) / s_full for w in weights]
        return sum(output_error(r - w, blocks) for r, w in zip(rounded, weights))

    ones = torch.ones_like(x_mean, dtype=torch.float32)
    rtn = error(expand(ones))
    best = (rtn, ones, {"alpha": 0.0, "duo": False})
    for duo in (False, True):
        if duo and expand(ones).shape != x_mean.shape:
            continue  # the duo form's weight statistics are per input feature: not for a tied scale
        for alpha, s in _candidates(x_mean, weights, group_size, duo):
            err = error(expand(s))
            if err < best[0]:
                best = (err, s, {"alpha": alpha, "duo": duo})
    err, s, info = best
    return s, {**info, "error": err, "rtn_error": rtn}


def search_clip(
    weight: torch.Tensor, blocks: torch.Tensor, group_size: int, min_zero: int = 0, asymmetric: bool = False
) -> torch.Tensor:
    """weight [N, K] clamped, per (row, group), to the range that minimises the group's output error
    dw_g B_g dw_g^T (each group's clip is chosen alone, as AutoAWQ does). AutoAWQ's range is +-max|w| shrunk
    by 0, 5, ..., 45%; asymmetric: [min(w) * (1 - a), max(w) * (1 - b)] with a and b from the same steps, at
    most two steps apart (the rounding grid's ends and its offset from zero move apart)."""
    n, k = weight.shape
    groups = k // group_size
    w = weight.float().view(n, groups, group_size)
    blocks = blocks.float()
    if asymmetric:
        org_lo, org_hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    else:
        org_hi = w.abs().amax(dim=-1, keepdim=True)
        org_lo = -org_hi
    steps = int(MAX_SHRINK * N_GRID)
    pairs = [(i, j) for i in range(steps) for j in range(steps) if abs(i - j) <= (2 if asymmetric else 0)]
    best_err = torch.full((n, groups), float("inf"))
    best_lo, best_hi = org_lo.clone(), org_hi.clone()
    for i, j in pairs:
        lo, hi = org_lo * (1 - i / N_GRID), org_hi * (1 - j / N_GRID)
        clipped = torch.maximum(torch.minimum(w, hi), lo)
        dw = fake_int4(clipped.view(n, k), group_size, min_zero).view(n, groups, group_size) - w
        err = group_errors(dw.view(n, k), blocks)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better[..., None], lo, best_lo)
        best_hi = torch.where(better[..., None], hi, best_hi)
    return torch.maximum(torch.minimum(w, best_hi), best_lo).view(n, k).to(weight.dtype)


def _scaled_blocks(blocks: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Gram blocks of x / s (the input a weight scaled by s sees)."""
    inv = (1.0 / s.double()).view(blocks.shape[0], blocks.shape[1])
    return blocks * inv[:, :, None] * inv[:, None, :]


def awq_transform(
    model_dir: str,
    tensors: dict[str, torch.Tensor],
    group_size: int,
    min_zero: int = 0,
    clip: bool = True,
    asymmetric_clip: bool = False,
    token_ids: list[list[int]] | None = None,
    log=None,
) -> dict[str, torch.Tensor]:
    """A copy of the HF state dict tensors (read from model_dir) with AWQ's scales folded in and the weights
    clipped: round-to-nearest of the result is AWQ's INT4. Calibration: token_ids (default: the shipped
    calibration text, calibration.py)."""
    from meshserve.models.calibration import AttentionShape, calibration_text_ids, collect_input_stats

    shape = AttentionShape.of(model_dir)
    num_layers, kv_heads, group, head_dim = shape.num_layers, shape.kv_heads, shape.group, shape.head_dim
    inputs = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")  # one per input
    names = {f"model.layers.{i}.{m}" for i in range(num_layers) for m in inputs}
    ids = token_ids or calibration_text_ids(model_dir, max_windows=8)
    stats = collect_input_stats(model_dir, ids, names, group_size)
    log = log or (lambda *_: None)
    out = dict(tensors)

    def scale_cols(name, s):  # w[:, k] *= s[k]
        out[name] = (out[name].float() * s[None, :]).to(tensors[name].dtype)

    def scale_rows(name, s):  # w[n, ...] /= s[n] (a norm's weight: w[n] /= s[n])
        w = out[name].float()
        out[name] = (w / s.view(-1, *([1] * (w.dim() - 1)))).to(tensors[name].dtype)

    for i in range(num_layers):
        p = f"model.layers.{i}"

        def weight(n, p=p):
            return out[f"{p}.{n}.weight"].float()

        st = {n.split(".")[1]: stats[f"{p}.{n}"] for n in inputs}
        qkv = [weight(f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj")]
        s_qkv, info = search_scale(qkv, st["q_proj"].abs_mean, st["q_proj"].blocks, group_size, min_zero)
        log(i, "qkv", info)
        x_o = st["o_proj"].abs_mean.view(kv_heads, group, head_dim).mean(dim=1).reshape(-1)
        o = [weight("self_attn.o_proj")]
        s_v, info = search_scale(o, x_o, st["o_proj"].blocks, group_size, min_zero, shape.tie_v_to_o)
        log(i, "o", info)
        gate_up = [weight("mlp.gate_proj"), weight("mlp.up_proj")]
        x_mlp = st["gate_proj"]
        s_mlp, info = search_scale(gate_up, x_mlp.abs_mean, x_mlp.blocks, group_size, min_zero)
        log(i, "gate/up", info)
        down = [weight("mlp.down_proj")]
        x_down = st["down_proj"]
        s_down, info = search_scale(down, x_down.abs_mean, x_down.blocks, group_size, min_zero)
        log(i, "down", info)
        scale_rows(f"{p}.input_layernorm.weight", s_qkv)
        for n in ("q_proj", "k_proj", "v_proj"):
            scale_cols(f"{p}.self_attn.{n}.weight", s_qkv)
        scale_rows(f"{p}.self_attn.v_proj.weight", s_v)
        scale_cols(f"{p}.self_attn.o_proj.weight", shape.tie_v_to_o(s_v))
        scale_rows(f"{p}.post_attention_layernorm.weight", s_mlp)
        for n in ("gate_proj", "up_proj"):
            scale_cols(f"{p}.mlp.{n}.weight", s_mlp)
        scale_rows(f"{p}.mlp.up_proj.weight", s_down)
        scale_cols(f"{p}.mlp.down_proj.weight", s_down)
        if not clip:
            continue
        seen = {  # the Gram blocks of each clipped projection's (scaled) input
            "self_attn.v_proj": _scaled_blocks(st["q_proj"].blocks, s_qkv),
            "self_attn.o_proj": _scaled_blocks(st["o_proj"].blocks, shape.tie_v_to_o(s_v)),
            "mlp.gate_proj": _scaled_blocks(st["gate_proj"].blocks, s_mlp),
            "mlp.up_proj": _scaled_blocks(st["gate_proj"].blocks, s_mlp),
            "mlp.down_proj": _scaled_blocks(st["down_proj"].blocks, s_down),
        }
        for n, blocks in seen.items():
            name = f"{p}.{n}.weight"
            out[name] = search_clip(out[name], blocks, group_size, min_zero, asymmetric_clip)
    return out
