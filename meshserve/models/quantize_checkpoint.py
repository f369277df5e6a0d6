"""meshserve's own checkpoint quantizer: a 16/32-bit HF folder in, a quantized HF folder out, in the layouts
public checkpoints use (so the loader is exercised on real numbers and real packing).

Formats written (quantization_config in config.json, tensors in model.safetensors):
  awq                 round-to-nearest asymmetric INT4 per group, AutoAWQ "gemm" packing (no activation-aware
                      search: this measures the format and the kernels, not AWQ's calibration)
  gptq                the same numbers in AutoGPTQ v1 packing (qzeros store zero - 1); desc_act=True permutes the
                      input features by descending weight-column norm (a calibration-free stand-in for the
                      Hessian order) and writes the matching g_idx
  compressed-tensors  fp8 e4m3 weights with per-channel ("channel") or per-tensor ("tensor") scales, dynamic
                      per-token activations, or a static per-tensor input_scale (a given value: no
                      calibration here); optionally k_scale / v_scale for an fp8 KV cache
  fbgemm_fp8          fp8 weights, weight_scale [N, 1], dynamic activations
Only the decoder's projections are quantized; embeddings, norms and the LM head are copied.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from meshserve.kernels.quant_ref import FP8_MAX, quantize_fp8_per_channel, quantize_int4_groups
from meshserve.layers.quantization.int4_formats import awq_pack, gptq_pack_cols, pack_int4_rows

FORMATS = ("awq", "gptq", "compressed-tensors", "fbgemm_fp8")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SHARED_INPUT = {p: ("q_proj", "k_proj", "v_proj") for p in ("q_proj", "k_proj", "v_proj")} | {
    p: ("gate_proj", "up_proj") for p in ("gate_proj", "up_proj")}


def is_projection(name: str) -> bool:
    parts = name.split(".")
    return name.startswith("model.layers.") and parts[-1] == "weight" and parts[-2] in _PROJECTIONS


def act_order(weights: list[torch.Tensor]) -> torch.Tensor:
    """The act-order permutation of input features shared by projections of one input (q/k/v, gate/up), as
    GPTQ's Hessian order is: here by descending total column norm."""
    norms = sum(w.float().norm(dim=0) ** 2 for w in weights)
    return torch.argsort(norms, descending=True, stable=True)


def int4_tensors(weight: torch.Tensor, fmt: str, group_size: int, desc_act: bool = False,
                 perm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The AWQ or GPTQ tensors (suffix -> tensor) of one weight [N, K]; desc_act: GPTQ act-order with the
    permutation perm (default: act_order([weight]))."""
    n, k = weight.shape
    if desc_act:
        perm = act_order([weight]) if perm is None else perm
        weight = weight[:, perm]
    else:
        perm = None
    q, scales, zeros = quantize_int4_groups(weight.float(), group_size)  # q [K, N] in (permuted) order
    scales = scales.half()
    if fmt == "gptq" and bool((zeros == 0).any()):
        # v1 stores zero - 1 in a nibble, so a zero point of 0 cannot be written (AutoGPTQ's own limit)
        zeros = zeros.clamp(min=1)
        groups = torch.arange(k) // group_size
        w = weight.float().t()
        q = (w / scales.float()[groups] + zeros[groups]).round().clamp(0, 15).to(torch.int32)
    zeros_int = zeros.to(torch.int32)
    if fmt == "awq":
        return {"qweight": awq_pack(q), "qzeros": awq_pack(zeros_int), "scales": scales}
    g_idx = torch.arange(k, dtype=torch.int32) // group_size
    if perm is not None:  # back to the checkpoint's feature order; g_idx says where each feature's group is
        inv = torch.argsort(perm)
        q, g_idx = q[inv], g_idx[inv]
    return {"qweight": pack_int4_rows(q), "qzeros": gptq_pack_cols((zeros_int - 1) & 0xF), "scales": scales,
            "g_idx": g_idx}


def fp8_tensors(weight: torch.Tensor, fmt: str, strategy: str = "channel",
                input_scale: float | None = None) -> dict[str, torch.Tensor]:
    if strategy == "tensor":
        scale = (weight.float().abs().max() / FP8_MAX).clamp(min=1e-12)
        out = {"weight": (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn),
               "weight_scale": scale.reshape(1)}
    else:
        w, s = quantize_fp8_per_channel(weight)
        out = {"weight": w, "weight_scale": s[:, None]}
    if fmt == "fbgemm_fp8":
        out["input_scale_ub"] = torch.tensor([1200.0])
    elif input_scale is not None:
        out["input_scale"] = torch.tensor([float(input_scale)])
    return out


def _quant_config(fmt: str, group_size: int, desc_act: bool, strategy: str, static: bool, kv: bool) -> dict:
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": False,
                "checkpoint_format": "gptq"}
    if fmt == "fbgemm_fp8":
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {**fp8, "strategy": strategy, "dynamic": False},
            "input_activations": {**fp8, "strategy": "tensor" if static else "token", "dynamic": not static}}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": {**fp8, "strategy": "tensor", "dynamic": False} if kv else None,
    }


def quantize_checkpoint(src: str, dst: str, fmt: str, group_size: int = 128, desc_act: bool = False,
                        strategy: str = "channel", input_scale: float | None = None,
                        kv_scale: float | None = None) -> str:
    """Write the quantized copy of the HF folder src to dst (see the module docstring); returns dst."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    os.makedirs(dst, exist_ok=True)
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(os.path.join(src, file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    out: dict[str, torch.Tensor] = {}
    num_layers = 0
    for name, tensor in tensors.items():
        if not is_projection(name):
            out[name] = tensor
            continue
        num_layers = max(num_layers, int(name.split(".")[2]) + 1)
        base = name[: -len(".weight")]
        if fmt in ("awq", "gptq"):
            perm = None
            if desc_act:  # projections that read the same input share one order
                siblings = _SHARED_INPUT.get(base.rsplit(".", 1)[-1], ())
                prefix = base.rsplit(".", 1)[0]
                perm = act_order([tensors[f"{prefix}.{s}.weight"] for s in siblings] or [tensor])
            parts = int4_tensors(tensor, fmt, group_size, desc_act, perm)
        else:
            parts = fp8_tensors(tensor, fmt, strategy, input_scale)
        out.update({f"{base}.{suffix}": t.contiguous() for suffix, t in parts.items()})
    if kv_scale is not None:
        for i in range(num_layers):
            out[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(float(kv_scale))
            out[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(float(kv_scale))
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = _quant_config(fmt, group_size, desc_act, strategy, input_scale is not None,
                                                  kv_scale is not None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(src):  # tokenizer and generation config travel with the weights
        if name.endswith((".json", ".model", ".txt")) and name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return dst
