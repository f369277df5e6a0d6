"""Sequential GPTQ (AutoGPTQ's layer-by-layer, "true sequential" order): every projection's Hessian comes from
the inputs it sees once everything before it is already quantized, so each rounding is fitted to the inputs
it will really get, not to the parallel variant's clean fp32 inputs (gptq.collect_hessians). (Its objective
is still |W X' - W_q X'| on those inputs X': it does not undo the earlier layers' error.)

The 16/32-bit model (transformers, CPU) is run once to the first decoder layer; then per layer, in the order
the data flows, q/k/v, then o, then gate/up, then down: the layer is run on the current inputs with Hessian
hooks on that stage's projections, they are quantized (quantize(name, weight, hessian) -> (checkpoint tensors,
the fp32 weight they hold)) and the held weights replace the originals, and finally the quantized layer's
outputs become the next layer's inputs.

asymmetric (GPTAQ, Li et al. 2025): the objective becomes |W X - W_q X'| with X the 16/32-bit model's own
inputs (a float copy of each layer run beside it on the float stream), so each rounding also undoes part of the
error the earlier quantized projections left in X'. Its minimiser is GPTQ on X' with the target weight
W + W (X - X') X'^T (X'^T X' + damping)^-1 (the least-squares correction, damped as GPTQ's Hessian is).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from meshserve.models.gptq import INT4_DAMP, SINK_WEIGHT, HessianSum

STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

Quantize = Callable[[str, torch.Tensor, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


class _Captured(Exception):
    pass


def load_float_model(model_dir: str, state_dict: dict[str, torch.Tensor] | None = None):
    """The transformers causal LM of model_dir in fp32, eval mode; state_dict: run these weights instead of
    model_dir's (e.g. AWQ's scaled copy), a tensor the model does not hold being an error."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state_dict is not None:
        loaded = model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
        if unexpected := loaded.unexpected_keys:
            raise ValueError(f"state_dict tensors the model does not hold: {unexpected[:3]}")
    return model


def first_layer_inputs(model, token_ids: list[list[int]]) -> tuple[list[torch.Tensor], list[dict]]:
    """The first decoder layer's input hidden states and keyword arguments (rotary embeddings, masks), one
    per window of token_ids, of a transformers causal LM (the embeddings alone are run)."""
    inputs: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def catch(_module, args, kw):
        inputs.append(args[0])
        kwargs.append(kw)
        raise _Captured

    handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for ids in token_ids:
            try:
                model.model(torch.tensor([ids]), use_cache=False)
            except _Captured:
                pass
    handle.remove()
    return inputs, kwargs


def sequential_quantize(
    model_dir: str,
    token_ids: list[list[int]],
    quantize: Quantize,
    state_dict: dict[str, torch.Tensor] | None = None,
    sink_weight: float = SINK_WEIGHT,
    asymmetric: bool = False,
    damp: float = INT4_DAMP,
) -> dict[str, dict[str, torch.Tensor]]:
    """module name (model.layers.i.self_attn.q_proj, ...) -> the checkpoint tensors quantize returned for it.
    state_dict: run these weights instead of model_dir's (e.g. AWQ's scaled copy). asymmetric: GPTAQ's
    target (the module docstring), its correction damped by damp of the mean diagonal."""
    if asymmetric and sink_weight != 1.0:
        raise ValueError("asymmetric sequential GPTQ counts every position once (sink_weight 1)")
    model = load_float_model(model_dir, state_dict)
    layers = model.model.layers
    inputs, kwargs = first_layer_inputs(model, token_ids)
    float_inputs = list(inputs)  # the float model's stream (asymmetric only)
    out: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            modules = dict(layer.named_modules())
            reference = copy.deepcopy(layer) if asymmetric else None
            ref_modules = dict(reference.named_modules()) if asymmetric else {}
            for stage in STAGES:
                sums = {n: HessianSum(modules[n].in_features, sink_weight) for n in stage}
                cross = {n: torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64)
                         for n in stage} if asymmetric else {}
                for x, kw, xf in zip(inputs, kwargs, float_inputs):
                    seen: dict[str, torch.Tensor] = {}

                    def capture(n, xq):
                        sums[n].add(xq)
                        seen[n] = xq

                    def correlate(n, xf_n):  # (X - X')^T X' of one window, the float copy on the float stream
                        xq = seen[n].flatten(0, -2)
                        cross[n].add_(((xf_n.flatten(0, -2) - xq).t() @ xq).double())

                    hooks = [modules[n].register_forward_hook(lambda _m, a, _o, n=n: capture(n, a[0]))
                             for n in stage]
                    layer(x, **kw)
                    if asymmetric:
                        hooks += [
                            ref_modules[n].register_forward_hook(lambda _m, a, _o, n=n: correlate(n, a[0]))
                            for n in stage
                        ]
                        reference(xf, **kw)
                    for h in hooks:
                        h.remove()
                for n in stage:
                    name = f"model.layers.{i}.{n}"
                    weight, hessian = modules[n].weight.data, sums[n].hessian()
                    if asymmetric:
                        weight = _asymmetric_target(weight, cross[n] * (2.0 / sums[n].weight), hessian, damp)
                    parts, held = quantize(name, weight, hessian)
                    modules[n].weight.data = held.to(modules[n].weight.dtype)
                    out[name] = parts
            inputs = [layer(x, **kw) for x, kw in zip(inputs, kwargs)]
            if asymmetric:
                float_inputs = [reference(x, **kw) for x, kw in zip(float_inputs, kwargs)]
    return out


def _asymmetric_target(weight: torch.Tensor, cross: torch.Tensor, hessian: torch.Tensor, damp: float):
    """GPTAQ's target argmin_V |W X - V X'|^2 + damping |V - W|^2 = W + W C H^-1 (damped), from
    cross C = 2 (X - X')^T X' / count [K, K] and hessian H = 2 X'^T X' / count (the same normalisation)."""
    h = hessian.clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    # V = W + W C H^-1 with C = (X - X')^T X' (rows: the input features of X - X'): (C H^-1) = solve(H, C^T)^T
    correction = torch.linalg.solve(h, cross.t()).t()
    return (weight.double() + weight.double() @ correction).to(weight.dtype)
