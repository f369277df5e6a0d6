"""Sequential GPTQ (AutoGPTQ's layer-by-layer, "true sequential" order): every projection's Hessian comes from
the inputs it sees once everything before it is already quantized, so each rounding is fitted to the inputs
it will really get, not to the parallel variant's clean fp32 inputs (gptq.collect_hessians). (Its objective
is still |W X' - W_q X'| on those inputs X': it does not undo the earlier layers' error.)

The 16/32-bit model (transformers, CPU) is run once to the first decoder layer; then per layer, in the order
the data flows, q/k/v, then o, then gate/up, then down: the layer is run on the current inputs with Hessian
hooks on that stage's projections, they are quantized (quantize(name, weight, hessian) -> (checkpoint tensors,
the fp32 weight they hold)) and the held weights replace the originals, and finally the quantized layer's
outputs become the next layer's inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from meshserve.models.gptq import SINK_WEIGHT, HessianSum

STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

Quantize = Callable[[str, torch.Tensor, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


class _Captured(Exception):
    pass


def sequential_quantize(
    model_dir: str,
    token_ids: list[list[int]],
    quantize: Quantize,
    state_dict: dict[str, torch.Tensor] | None = None,
    sink_weight: float = SINK_WEIGHT,
) -> dict[str, dict[str, torch.Tensor]]:
    """module name (model.layers.i.self_attn.q_proj, ...) -> the checkpoint tensors quantize returned for it.
    state_dict: run these weights instead of model_dir's (e.g. AWQ's scaled copy)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state_dict is not None:
        loaded = model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
        if unexpected := loaded.unexpected_keys:
            raise ValueError(f"state_dict tensors the model does not hold: {unexpected[:3]}")
    layers = model.model.layers
    inputs: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def catch(_module, args, kw):
        inputs.append(args[0])
        kwargs.append(kw)
        raise _Captured

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for ids in token_ids:
            try:
                model.model(torch.tensor([ids]), use_cache=False)
            except _Captured:
                pass
    handle.remove()
    out: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            modules = dict(layer.named_modules())
            for stage in STAGES:
                sums = {n: HessianSum(modules[n].in_features, sink_weight) for n in stage}
                hooks = [
                    modules[n].register_forward_hook(lambda _m, args, _o, s=sums[n]: s.add(args[0]))
                    for n in stage
                ]
                for x, kw in zip(inputs, kwargs):
                    layer(x, **kw)
                for h in hooks:
                    h.remove()
                for n in stage:
                    name = f"model.layers.{i}.{n}"
                    parts, held = quantize(name, modules[n].weight.data, sums[n].hessian())
                    modules[n].weight.data = held.to(modules[n].weight.dtype)
                    out[name] = parts
            inputs = [layer(x, **kw) for x, kw in zip(inputs, kwargs)]
    return out
