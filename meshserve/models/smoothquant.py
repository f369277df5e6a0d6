"""SmoothQuant (Xiao et al., 2023) for meshserve's quantizer: per-input-channel scales that move activation
outliers into the weights before W8A8 (fp8 weights, fp8 activations), so per-token activation rounding loses
less on the few loud features.

For each projection input, s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (max|w_j| over every projection reading
that input, max|x_j| over the calibration tokens), as llm-compressor's SmoothQuantModifier computes it; x / s
and W * s are folded into the layer before, so the fp32 function is unchanged:
  q/k/v      input_layernorm's weight / s
  gate/up    post_attention_layernorm's weight / s
  o          v_proj's output rows / s (inner=True); under grouped-query attention one scale per v row, shared
             by every query head reading that kv head (max|x| and max|w| over the tied features)
  down       up_proj's output rows / s (inner=True; silu(gate) * up is linear in up)
llm-compressor's default Llama mappings are the two norms; the inner folds are exact too, so they are on by
default here. Calibration: the shipped calibration text (models/calibration.py), never the evaluation text.
"""

from __future__ import annotations

import torch

from meshserve.kernels.quant_ref import FP8_MAX

DEFAULT_ALPHA = 0.5
_STATS_GROUP = 32  # collect_input_stats' Gram blocks are not used here; 32 divides every width (tests: 96)
_INPUTS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")  # one per input


def smoothing_scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] = max|x|^alpha / max|w|^(1 - alpha) per input feature, weights [*, K] read the same input; a
    feature that never fires (or whose weights are all zero) keeps s = 1."""
    w_max = torch.cat([w.float().abs() for w in weights], dim=0).amax(dim=0)
    s = x_max.float().clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s)).clamp(min=1e-5)


def smooth_transform(
    model_dir: str,
    tensors: dict[str, torch.Tensor],
    alpha: float | None = DEFAULT_ALPHA,
    inner: bool = True,
    token_ids: list[list[int]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A copy of the HF state dict tensors with SmoothQuant's scales folded in, and the static per-tensor fp8
    input scale of every projection's (smoothed) input on the calibration tokens (module name -> max|x / s| /
    448), for checkpoints with static activations. alpha None: no smoothing, the input scales alone."""
    from meshserve.models.calibration import AttentionShape, calibration_text_ids, collect_input_stats

    shape = AttentionShape.of(model_dir)
    num_layers, kv_heads, group, head_dim = shape.num_layers, shape.kv_heads, shape.group, shape.head_dim
    names = {f"model.layers.{i}.{m}" for i in range(num_layers) for m in _INPUTS}
    ids = token_ids or calibration_text_ids(model_dir, max_windows=8)
    stats = collect_input_stats(model_dir, ids, names, _STATS_GROUP)
    out = dict(tensors)
    input_scales: dict[str, float] = {}

    def w(name):
        return out[name].float()

    def put(name, t):
        out[name] = t.to(tensors[name].dtype)

    def scales(x_max, weights):
        return torch.ones_like(x_max) if alpha is None else smoothing_scales(x_max, weights, alpha)

    for i in range(num_layers):
        p = f"model.layers.{i}"
        x = {n.split(".")[1]: stats[f"{p}.{n}"].abs_max for n in _INPUTS}
        qkv = [f"{p}.self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj")]
        s_qkv = scales(x["q_proj"], [w(n) for n in qkv])
        put(f"{p}.input_layernorm.weight", w(f"{p}.input_layernorm.weight") / s_qkv)
        for n in qkv:
            put(n, w(n) * s_qkv[None, :])
        gate_up = [f"{p}.mlp.{n}.weight" for n in ("gate_proj", "up_proj")]
        s_mlp = scales(x["gate_proj"], [w(n) for n in gate_up])
        put(f"{p}.post_attention_layernorm.weight", w(f"{p}.post_attention_layernorm.weight") / s_mlp)
        for n in gate_up:
            put(n, w(n) * s_mlp[None, :])
        s_o, s_down = torch.ones_like(x["o_proj"]), torch.ones_like(x["down_proj"])
        if inner:
            v, o = f"{p}.self_attn.v_proj.weight", f"{p}.self_attn.o_proj.weight"
            # tied over the query heads of one kv head: max over them of max|x| and of max|w|
            x_o = x["o_proj"].view(kv_heads, group, head_dim).amax(dim=1).reshape(-1)
            w_o = w(o).abs().view(-1, kv_heads, group, head_dim).amax(dim=(0, 2)).reshape(1, -1)
            s_v = scales(x_o, [w_o])
            s_o = shape.tie_v_to_o(s_v)
            put(v, w(v) / s_v[:, None])
            put(o, w(o) * s_o[None, :])
            up, down = f"{p}.mlp.up_proj.weight", f"{p}.mlp.down_proj.weight"
            s_down = scales(x["down_proj"], [w(down)])
            put(up, w(up) / s_down[:, None])
            put(down, w(down) * s_down[None, :])
        for n, s in (("q_proj", s_qkv), ("o_proj", s_o), ("gate_proj", s_mlp), ("down_proj", s_down)):
            scale = float((x[n] / s).amax()) / FP8_MAX
            for sib in {"q_proj": ("q", "k", "v"), "gate_proj": ("gate", "up")}.get(n, (n[: -len("_proj")],)):
                module = "self_attn" if n in ("q_proj", "o_proj") else "mlp"
                input_scales[f"{p}.{module}.{sib}_proj"] = scale
    return out, input_scales
