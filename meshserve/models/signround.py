"""SignRound (Cheng et al. 2023, arXiv 2309.05516; what Intel's AutoRound implements) for meshserve's int4
quantizer: instead of rounding every weight to its nearest level (or GPTQ's column-by-column error feedback),
learn per decoder layer how each weight rounds, by fitting the whole layer's output.

Per weight w of a group (G input features of one output row) with the group's range [min, max]:
  scale = (max * alpha - min * beta) / 15,  zero = round(-min * beta / scale)   (alpha, beta in [0.5, 1])
  q     = clamp(round(w / scale + v) + zero, 0, 15)                              (v in [-0.5, 0.5])
v = 0, alpha = beta = 1 is round-to-nearest (quant_ref.quantize_int4_groups); v flips a weight's rounding
up or down, alpha and beta clip the group's range. All three are learnt per decoder layer at once (every
projection of it together) by signed gradient descent: p -= lr * sign(dL/dp), lr decaying linearly from
lr0 (1 / iters by default) to 0, with round() passed straight through in the backward pass, on the loss
L = mean |layer_q(x_q) - layer(x)|^2 over a calibration window per step. x_q is the layer's input from the
already-quantized earlier layers (as gptq_sequential runs them); the target is the float layer on the float
model's own stream x (float_target, AutoRound's default: the rounding may undo part of the earlier layers'
error) or on x_q. The parameters with the lowest loss over a pass through the windows are kept, and
round-to-nearest instead if they do no better on all windows. The result is ordinary int4 groups (q, fp16
scales, integer zeros, plain g_idx) for the AWQ / GPTQ writers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from meshserve.kernels.quant_ref import Int4Weights
from meshserve.models.gptq_sequential import first_layer_inputs, load_float_model

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class SignRoundConfig:
    iters: int = 200  # signed-gradient steps per decoder layer
    lr: float | None = None  # the first step's size (v's units); None: 1 / iters (AutoRound's)
    windows_per_step: int = 1  # calibration windows in each step's batch
    clip: bool = True  # learn each group's min / max clip factors too (else v alone)
    float_target: bool = True  # fit the float layer on the float stream (else on the quantized stream)
    min_clip: float = 0.5  # the clip factors' lower bound


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through)."""
    return x + (x.round() - x).detach()


class GroupRounding:
    """The learnt rounding of one weight [N, K] in groups of group_size input features: v [N, K] and the clip
    factors alpha, beta [N, K / G]."""

    def __init__(self, weight: torch.Tensor, group_size: int, min_zero: int = 0):
        n, k = weight.shape
        if k % group_size:
            raise ValueError(f"input features ({k}) are not a multiple of the group size ({group_size})")
        self.w = weight.detach().float().view(n, k // group_size, group_size)
        self.lo = self.w.amin(dim=-1).clamp(max=0.0)
        self.hi = self.w.amax(dim=-1).clamp(min=0.0)
        self.min_zero = min_zero
        self.v = torch.zeros_like(self.w, requires_grad=True)
        self.alpha = torch.ones_like(self.hi, requires_grad=True)
        self.beta = torch.ones_like(self.lo, requires_grad=True)

    def params(self) -> list[torch.Tensor]:
        return [self.v, self.alpha, self.beta]

    def levels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, scale, zero): q [N, K / G, G], scale and zero [N, K / G]; the scale as stored (fp16)."""
        scale = ((self.hi * self.alpha - self.lo * self.beta) / 15.0).clamp(min=1e-8)
        zero = _round_ste(-self.lo * self.beta / scale).clamp(self.min_zero, 15)  # as quantize_int4_groups
        scale = scale + (scale.half().float() - scale).detach()  # the weights round on the stored scale
        q = (_round_ste(self.w / scale[..., None] + self.v) + zero[..., None]).clamp(0, 15)
        return q, scale, zero

    def fake(self) -> torch.Tensor:
        """The dequantized weight [N, K] (differentiable in v, alpha, beta)."""
        q, scale, zero = self.levels()
        return ((q - zero[..., None]) * scale[..., None]).flatten(1)

    def clamp_(self, min_clip: float) -> None:
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)
            self.alpha.clamp_(min_clip, 1.0)
            self.beta.clamp_(min_clip, 1.0)

    def export(self) -> Int4Weights:
        with torch.no_grad():
            q, scale, zero = self.levels()
        n, groups, size = q.shape
        g_idx = torch.arange(groups * size, dtype=torch.int32) // size
        return Int4Weights(q.flatten(1).t().to(torch.int32).contiguous(), scale.t().contiguous(),
                           zero.t().contiguous(), g_idx)


def _layer_loss(layer, roundings: dict[str, GroupRounding], x, kw, target) -> torch.Tensor:
    weights = {f"{n}.weight": r.fake() for n, r in roundings.items()}
    out = torch.func.functional_call(layer, weights, (x,), kw, strict=False)
    out = out[0] if isinstance(out, tuple) else out
    return torch.mean((out - target) ** 2)


def signround_layer(
    layer: torch.nn.Module,
    inputs: list[torch.Tensor],
    kwargs: list[dict],
    targets: list[torch.Tensor],
    group_size: int,
    min_zero: int = 0,
    config: SignRoundConfig = SignRoundConfig(),
    names: tuple[str, ...] = PROJECTIONS,
) -> tuple[dict[str, Int4Weights], dict]:
    """The learnt int4 rounding of the projections names of one decoder layer, fitted so that the layer with
    them run on inputs approaches targets (one tensor per calibration window). Returns (name -> Int4Weights,
    {"rtn_loss", "loss", "kept"}: the mean loss over all windows of round-to-nearest and of the result)."""
    for p in layer.parameters():
        p.requires_grad_(False)
    modules = dict(layer.named_modules())
    roundings = {n: GroupRounding(modules[n].weight, group_size, min_zero) for n in names}

    def full_loss() -> float:
        with torch.no_grad():
            return sum(float(_layer_loss(layer, roundings, x, kw, t))
                       for x, kw, t in zip(inputs, kwargs, targets))

    rtn_loss = full_loss()
    rtn_state = {n: [p.detach().clone() for p in r.params()] for n, r in roundings.items()}
    lr0 = config.lr if config.lr is not None else 1.0 / config.iters
    params = [p for r in roundings.values() for p in r.params() if config.clip or p is r.v]
    steps_per_pass = max(1, len(inputs) // config.windows_per_step)
    best, best_state, pass_loss = float("inf"), rtn_state, 0.0
    for it in range(config.iters):
        lr = lr0 * (1.0 - it / config.iters)
        first = (it % steps_per_pass) * config.windows_per_step
        loss = sum(_layer_loss(layer, roundings, inputs[j], kwargs[j], targets[j])
                   for j in range(first, first + config.windows_per_step))
        loss.backward()
        pass_loss += float(loss.detach())
        with torch.no_grad():
            for p in params:
                p -= lr * torch.sign(p.grad)
                p.grad = None
        for r in roundings.values():
            r.clamp_(config.min_clip)
        if (it + 1) % steps_per_pass == 0:  # a pass over the windows: its summed loss scores its parameters
            if pass_loss < best:
                best = pass_loss
                best_state = {n: [p.detach().clone() for p in r.params()] for n, r in roundings.items()}
            pass_loss = 0.0

    def load(state):
        with torch.no_grad():
            for n, r in roundings.items():
                for p, value in zip(r.params(), state[n]):
                    p.copy_(value)

    load(best_state)
    loss, kept = full_loss(), "signround"
    if loss > rtn_loss:
        load(rtn_state)
        loss, kept = rtn_loss, "rtn"
    return {n: r.export() for n, r in roundings.items()}, {"rtn_loss": rtn_loss, "loss": loss, "kept": kept}


def signround_quantize(
    model_dir: str,
    token_ids: list[list[int]],
    group_size: int,
    min_zero: int = 0,
    config: SignRoundConfig = SignRoundConfig(),
    state_dict: dict[str, torch.Tensor] | None = None,
    log=None,
) -> dict[str, Int4Weights]:
    """module name (model.layers.i.self_attn.q_proj, ...) -> its SignRound int4 weight, layer by layer on
    token_ids' windows. state_dict: run these weights instead of model_dir's (e.g. AWQ's scaled copy)."""
    from meshserve.models.gptq import int4_dequant

    model = load_float_model(model_dir, state_dict)
    layers = model.model.layers
    inputs, kwargs = first_layer_inputs(model, token_ids)
    log = log or (lambda *_: None)
    float_inputs = list(inputs)
    out: dict[str, Int4Weights] = {}

    def run(layer, xs):
        with torch.no_grad():
            ys = [layer(x, **kw) for x, kw in zip(xs, kwargs)]
        return [y[0] if isinstance(y, tuple) else y for y in ys]

    for i, layer in enumerate(layers):
        start = time.perf_counter()
        float_outputs = run(layer, float_inputs if config.float_target else inputs)
        quantized, info = signround_layer(layer, inputs, kwargs, float_outputs, group_size, min_zero, config)
        modules = dict(layer.named_modules())
        for n, qw in quantized.items():
            out[f"model.layers.{i}.{n}"] = qw
            modules[n].weight.data = int4_dequant(qw).to(modules[n].weight.dtype)
        inputs = run(layer, inputs)
        if config.float_target:
            float_inputs = float_outputs
        log(i, {**info, "seconds": time.perf_counter() - start})
    return out
