"""GPTQ (Frantar et al., 2022) for meshserve's quantizer: INT4 weights that minimise each projection's output
error on calibration inputs, instead of rounding every weight to its nearest level.

collect_hessians runs the 16/32-bit model (transformers, CPU) over calibration token ids and accumulates
H = 2 X^T W X / sum(W) for the input X of every decoder projection (all layers at once, from the unquantized
model's activations: the "parallel" variant, no layer-by-layer re-run). Every position counts, the first of
each window (the attention sink) with weight SINK_WEIGHT: its activations are orders of magnitude louder than
the rest and point along features the other tokens barely use, so a Hessian without it lets GPTQ push the
rounding error of every other column into exactly those features, which corrupts the sink's keys and values
that every later token attends to (SmolLM2 int4 g32: +79% perplexity with the sink left out, +35% with it at
weight 1; QUANTIZATION.md). calibration_ids makes data-free calibration
text by sampling from the model itself, so no evaluation text leaks into the quantizer. gptq_quantize then
quantizes one weight column by column (blocks of 128, lazy batch updates), spreading each column's rounding
error over the columns not yet quantized through the Cholesky factor of H^-1; act_order visits columns by
descending diag(H) and records the groups in g_idx.
"""

from __future__ import annotations

import torch

from meshserve.kernels.quant_ref import FP8_DTYPE, FP8_MAX, Int4Weights, to_fp8


def calibration_ids(
    model_dir: str, num_sequences: int = 16, length: int = 256, seed: int = 0, top_p: float = 0.95
) -> list[list[int]]:
    """Token ids sampled from the model itself (temperature 1, top_p) from its BOS token: [BOS] + length
    tokens per sequence. The BOS prompt is attended to (an explicit all-ones attention mask): without one,
    transformers infers the mask from pad_token_id == input, and with pad = BOS it masked the only prompt
    token out, so every sequence was sampled without its attention sink (QUANTIZATION.md)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 0
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    prompt = torch.full((num_sequences, 1), bos)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_p=top_p,
            temperature=1.0,
            max_new_tokens=length,
            min_new_tokens=length,  # eos is never sampled, so no sequence is ever padded
            pad_token_id=eos if eos is not None else bos,
        )
    return out.tolist()


SINK_WEIGHT = 1.0  # how many tokens the first position of a window counts as in the Hessian
# int4's damping (fraction of mean diag(H) added to the diagonal): a few thousand calibration tokens estimate
# down_proj's 1536-feature Hessian poorly, and at 1% GPTQ fits the calibration text's directions so closely
# that on other text its output error exceeds round-to-nearest's (SmolLM2 layers 1, 3-5: 1.1-1.3x); 10% keeps
# the error feedback to directions the text really holds
INT4_DAMP = 0.1


class HessianSum:
    """H = 2 X^T W X / sum(W) of one projection's input over calibration windows, W the per-position weights
    (the first position of every window SINK_WEIGHT, the rest 1)."""

    def __init__(self, features: int, sink_weight: float = SINK_WEIGHT):
        self.sum = torch.zeros(features, features, dtype=torch.float64)
        self.weight = 0.0
        self.sink_weight = sink_weight

    def add(self, x: torch.Tensor) -> None:
        """x [B, T, K]: B windows of T positions, position 0 each window's first."""
        w = torch.ones(x.shape[1], dtype=torch.float32)
        w[0] = self.sink_weight
        xf = x.float()
        w = w.expand(x.shape[0], -1).reshape(-1, 1)
        xf = xf.reshape(-1, x.shape[-1])
        # fp32 products (a few times faster on a CPU), accumulated in fp64
        self.sum += ((xf * w).t() @ xf).double()
        self.weight += float(w.sum())

    def hessian(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.weight, 1e-12))


def collect_hessians(
    model_dir: str,
    token_ids: list[list[int]],
    names: set[str],
    state_dict: dict[str, torch.Tensor] | None = None,
    sink_weight: float = SINK_WEIGHT,
) -> dict[str, torch.Tensor]:
    """H [K, K] (fp64) of the input of every nn.Linear whose module name is in names; state_dict: run these
    weights instead of model_dir's (e.g. AWQ's scaled copy, whose projections see x / s)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state_dict is not None:
        loaded = model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
        if unexpected := loaded.unexpected_keys:
            raise ValueError(f"state_dict tensors the model does not hold: {unexpected[:3]}")
    sums: dict[str, HessianSum] = {}
    hooks = []
    for name, module in model.named_modules():
        if name in names and isinstance(module, torch.nn.Linear):
            sums[name] = HessianSum(module.in_features, sink_weight)
            hooks.append(module.register_forward_hook(lambda _m, args, _o, s=sums[name]: s.add(args[0])))
    with torch.no_grad():
        for ids in token_ids:
            model.model(torch.tensor([ids]))  # the decoder alone: the LM head's logits are not needed
    for h in hooks:
        h.remove()
    return {name: s.hessian() for name, s in sums.items()}


def _group_params(w: torch.Tensor, min_zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit scale and zero [N] for the columns w [N, G] (as quant_ref.quantize_int4_groups)."""
    w_min, w_max = w.amin(dim=1).clamp(max=0.0), w.amax(dim=1).clamp(min=0.0)
    scale = ((w_max - w_min) / 15.0).clamp(min=1e-8)
    zero = (-w_min / scale).round().clamp(min_zero, 15)
    return scale, zero


MSE_SHRINK_STEP = 0.025  # each end of a group's range shrunk by 0, 2.5, ..., 10% (AWQ's clip, finer, shorter)
MSE_SHRINK_STEPS = 5
# step multipliers tried at the plain range's zero point +-1: a grid a little finer or coarser than the
# range / 15 slides its levels against the weights' own (a Q4_1 GGUF's weights sit on a 16-level grid with
# a float offset that an integer zero point cannot hold: QUANTIZATION.md)
MSE_STEP_SCALES = (0.9, 0.95, 1.0, 1.05, 1.1)


def search_group_params(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static GPTQ groups with searched levels: scale and zero [K / G, N] per (group, output row) of the
    original weight [N, K], the candidate that minimises the group's round-to-nearest output error
    dw_g H_gg dw_g^T (H's diagonal block of the group: GPTQ's own loss without the cross-group terms).
    Candidates: the ranges [min(w) (1 - a), max(w) (1 - b)] (a, b multiples of MSE_SHRINK_STEP, at most one
    step apart: AWQ's asymmetric clip), and the plain range's step times MSE_STEP_SCALES with its
    zero point moved by -1, 0, 1. The Hessian-weighted form of AutoGPTQ's mse grid (which weighs every
    weight alike)."""
    n, k = weight.shape
    groups = k // group_size
    w = weight.float().view(n, groups, group_size)  # fp32: ~30 candidates over every weight
    spans = [slice(g * group_size, (g + 1) * group_size) for g in range(groups)]
    hb = torch.stack([hessian[s, s] for s in spans]).float()
    lo0, hi0 = w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0)
    base = ((hi0 - lo0) / 15.0).clamp(min=1e-8)

    def candidates():
        for i in range(MSE_SHRINK_STEPS):
            for j in range(max(0, i - 1), min(MSE_SHRINK_STEPS, i + 2)):
                lo, hi = lo0 * (1 - i * MSE_SHRINK_STEP), hi0 * (1 - j * MSE_SHRINK_STEP)
                scale = ((hi - lo) / 15.0).clamp(min=1e-8)
                yield scale, (-lo / scale).round().clamp(min_zero, 15)
        for c in MSE_STEP_SCALES:
            for dz in (-1, 0, 1):
                scale = base * c
                yield scale, ((-lo0 / scale).round() + dz).clamp(min_zero, 15)

    best = torch.full((n, groups), float("inf"))
    best_scale, best_zero = base.clone(), torch.zeros_like(base)
    for scale, zero in candidates():
        q = (w / scale[..., None] + zero[..., None]).round().clamp(0, 15)
        dw = ((q - zero[..., None]) * scale[..., None] - w).transpose(0, 1)  # [groups, N, G]
        err = (torch.bmm(dw, hb) * dw).sum(dim=-1).t()  # awq.group_errors, batched per group
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale.t().double().contiguous(), best_zero.t().double().contiguous()


def refit_scales(qw: Int4Weights, weight: torch.Tensor, hessian: torch.Tensor, damp: float = INT4_DAMP,
                 rows: int = 256) -> Int4Weights:
    """The scales [G, N] that minimise GPTQ's loss (W - W_q) H (W - W_q)^T (H damped as GPTQ's) for GPTQ's
    rounded integers and zero points held fixed: per output row a least-squares fit of its G group scales,
    (A H A^T) s = A H w, A [G, K] the row's q - zero per group. GPTQ fixes each group's scale before the
    error feedback moves its weights (static groups: before any), so the rounded integers it ends with are
    fitted best by a slightly different scale. The format is unchanged (only the fp16 scales move)."""
    q = qw.q.t().double()  # [N, K]
    n, k = q.shape
    g_idx = qw.g_idx.long()
    groups = qw.scales.shape[0]
    order = torch.argsort(g_idx, stable=True)  # each group's features together
    size = k // groups
    a = (q - qw.zeros.round().double()[g_idx].t())[:, order]  # [N, K], q - zero
    h = hessian.double()[order][:, order].clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    w = weight.double()[:, order]
    h4 = h.view(groups, size, groups, size)
    scales = qw.scales.double().t().clone()  # [N, G]
    for r0 in range(0, n, rows):
        ar = a[r0 : r0 + rows].view(-1, groups, size)
        m = torch.einsum("rgi,gihj,rhj->rgh", ar, h4, ar)
        b = torch.einsum("rgi,rgi->rg", ar, (w[r0 : r0 + rows] @ h).view(-1, groups, size))
        # a group whose integers all sit on its zero point has no say in its scale: keep the old one there
        ridge = 1e-6 * m.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-30)
        m = m + torch.diag_embed(ridge[:, None].expand(-1, groups))
        b = b + ridge[:, None] * scales[r0 : r0 + rows]
        scales[r0 : r0 + rows] = torch.linalg.solve(m, b[..., None])[..., 0]
    return Int4Weights(qw.q, scales.t().float().contiguous(), qw.zeros, qw.g_idx)


def int4_dequant(qw: Int4Weights) -> torch.Tensor:
    """The fp32 weight [N, K] an Int4Weights holds, with scales rounded to the checkpoint's fp16."""
    g = qw.g_idx.long()
    return ((qw.q.float() - qw.zeros.round()[g]) * qw.scales.half().float()[g]).t().contiguous()


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    act_order: bool = False,
    min_zero: int = 0,
    damp: float = INT4_DAMP,
    block: int = 128,
    mse: bool = False,
    refit: bool = False,
) -> Int4Weights:
    """GPTQ of weight [N, K] with H [K, K]; min_zero 1 keeps zero points writable in GPTQ v1's zero - 1.
    mse: static groups (features k // group_size, whatever the visiting order, so act-order keeps plain
    groups), each group's scale and zero from search_group_params before any error feedback; otherwise each
    group's levels come from its weights as updated when GPTQ reaches it (act-order groups then follow the
    visiting order, and g_idx records them). refit: the scales re-fitted to the final integers
    (refit_scales)."""
    w = weight.double().clone()
    n, k = w.shape
    h = hessian.clone()
    static = search_group_params(weight, hessian, group_size, min_zero) if mse else None
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(n, k, dtype=torch.int32)
    scales = torch.zeros(k // group_size, n, dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    scale = zero = None
    if static is not None:
        scales, zeros = static[0].clone(), static[1].clone()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = int(perm[col]) // group_size
                scale, zero = scales[g], zeros[g]
            elif col % group_size == 0:  # this group's levels, from the weights as updated so far
                cur = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group_size]
                scale, zero = _group_params(cur, min_zero)
                scales[col // group_size], zeros[col // group_size] = scale, zero
            qi = (w1[:, i] / scale + zero).round().clamp(0, 15)
            q[:, col] = qi.to(torch.int32)
            err = (w1[:, i] - (qi - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    g_idx = torch.arange(k, dtype=torch.int32) // group_size
    if static is None:  # groups in visiting order
        g_idx = g_idx[inv]
    qw = Int4Weights(q.t()[inv].contiguous(), scales.float(), zeros.float(), g_idx)
    return refit_scales(qw, weight, hessian, damp) if refit else qw


def gptq_fp8_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's error feedback with FP8 e4m3 rounding: weight [N, K] -> (fp8 weight [N, K], fp32 scale [N]), the
    per-output-channel scale fixed first from each row's absmax (quant_ref.quantize_fp8_per_channel's), then
    every column rounded to e4m3 and its error spread over the columns not yet rounded. The result is an
    ordinary per-channel FP8 checkpoint weight (compressed-tensors "channel")."""
    w = weight.double().clone()
    n, k = w.shape
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(n, k, dtype=FP8_DTYPE)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            qi = to_fp8(w1[:, i].float(), scale.float())
            q[:, i1 + i] = qi
            err = (w1[:, i] - qi.double() * scale) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q, scale.float()
