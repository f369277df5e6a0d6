"""meshserve's own checkpoint quantizer: a 16/32-bit HF folder in, a quantized HF folder out, in the layouts
public checkpoints use (so the loader is exercised on real numbers and real packing).

Formats written (quantization_config in config.json, tensors in model.safetensors):
  awq                 asymmetric INT4 per group in AutoAWQ "gemm" packing (no activation-aware scale search: the
                      numbers are round-to-nearest, or GPTQ's with calibration="gptq")
  gptq                the same in AutoGPTQ v1 packing (qzeros store zero - 1, so zero points are kept >= 1);
                      desc_act=True writes act-order groups and their g_idx (by the calibration Hessian's
                      diagonal, or without calibration by weight-column norm)
  compressed-tensors  fp8 e4m3 weights with per-channel ("channel") or per-tensor ("tensor") scales, dynamic
                      per-token activations, or a static per-tensor input_scale (a given value: no
                      calibration here); optionally k_scale / v_scale for an fp8 KV cache
  fbgemm_fp8          fp8 weights, weight_scale [N, 1], dynamic activations
  fp8_block           HF "fp8" with weight_block_size [128, 128] (DeepSeek-V3 / Qwen3 FP8): fp8 weights with
                      weight_scale_inv [ceil(N / 128), ceil(K / 128)], dynamic per-token-group activations; also
                      MLA's projections (q_a/q_b/kv_a/kv_b), as DeepSeek's checkpoints store them, and every
                      routed expert's projections (Mixtral's w1/w2/w3 too)
Only the decoder's projections are quantized; embeddings, norms and the LM head are copied.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch

from meshserve.kernels.fp8_block_ref import quantize_fp8_blockwise
from meshserve.kernels.quant_ref import FP8_MAX, Int4Weights, quantize_fp8_per_channel, quantize_int4_groups
from meshserve.layers.quantization.int4_formats import awq_pack, gptq_pack_cols, pack_int4_rows
from meshserve.models.checkpoint_files import safetensors_files
from meshserve.models.signround import SignRoundConfig

FORMATS = ("awq", "gptq", "compressed-tensors", "fbgemm_fp8", "fp8_block")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MLA_PROJECTIONS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")  # fp8_block only
_MIXTRAL_EXPERTS = ("w1", "w2", "w3")  # fp8_block only (Qwen's and DeepSeek's experts are gate/up/down_proj)
_SHARED_INPUT = {p: ("q_proj", "k_proj", "v_proj") for p in ("q_proj", "k_proj", "v_proj")} | {
    p: ("gate_proj", "up_proj") for p in ("gate_proj", "up_proj")
}


def is_projection(name: str, extra: tuple[str, ...] = ()) -> bool:
    parts = name.split(".")
    return name.startswith("model.layers.") and parts[-1] == "weight" and parts[-2] in _PROJECTIONS + extra


def act_order(weights: list[torch.Tensor]) -> torch.Tensor:
    """A calibration-free act-order permutation of input features shared by projections of one input (q/k/v,
    gate/up), as GPTQ's Hessian order is: by descending total column norm."""
    norms = sum(w.float().norm(dim=0) ** 2 for w in weights)
    return torch.argsort(norms, descending=True, stable=True)


def rtn_quantize(
    weight: torch.Tensor, group_size: int, perm: torch.Tensor | None = None, min_zero: int = 0
) -> Int4Weights:
    """Round-to-nearest INT4 of weight [N, K]; perm: visit input features in this order (act-order groups)."""
    k = weight.shape[1]
    perm = torch.arange(k) if perm is None else perm
    q, scales, zeros = quantize_int4_groups(weight.float()[:, perm], group_size, min_zero)
    inv = torch.argsort(perm)
    g_idx = (torch.arange(k, dtype=torch.int32) // group_size)[inv]
    return Int4Weights(q[inv].contiguous(), scales, zeros, g_idx)


def pack_int4(qw: Int4Weights, fmt: str) -> dict[str, torch.Tensor]:
    """The AWQ or GPTQ (v1) checkpoint tensors (suffix -> tensor) of one quantized weight."""
    zeros = qw.zeros.round().to(torch.int32)
    if fmt == "awq":
        if not torch.equal(qw.g_idx.long(), torch.arange(qw.q.shape[0]) // (qw.q.shape[0] // zeros.shape[0])):
            raise ValueError("awq has no g_idx: act-order weights can only be written as gptq")
        return {"qweight": awq_pack(qw.q), "qzeros": awq_pack(zeros), "scales": qw.scales.half()}
    if bool((zeros < 1).any()):
        raise ValueError("gptq v1 stores zero - 1: zero points must be >= 1 (quantize with min_zero=1)")
    return {
        "qweight": pack_int4_rows(qw.q),
        "qzeros": gptq_pack_cols(zeros - 1),
        "scales": qw.scales.half(),
        "g_idx": qw.g_idx,
    }


def int4_tensors(
    weight: torch.Tensor, fmt: str, group_size: int, desc_act: bool = False, perm: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Round-to-nearest, then fmt's tensors, for weight [N, K]; desc_act: GPTQ act-order with the permutation
    perm (default: act_order([weight]))."""
    if desc_act:
        perm = act_order([weight]) if perm is None else perm
    return pack_int4(rtn_quantize(weight, group_size, perm if desc_act else None, int(fmt == "gptq")), fmt)


def fp8_tensors(
    weight: torch.Tensor, fmt: str, strategy: str = "channel", input_scale: float | None = None
) -> dict[str, torch.Tensor]:
    if strategy == "tensor":
        scale = (weight.float().abs().max() / FP8_MAX).clamp(min=1e-12)
        out = {
            "weight": (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn),
            "weight_scale": scale.reshape(1),
        }
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
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
        }
    if fmt == "gptq":
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "desc_act": desc_act,
            "sym": False,
            "checkpoint_format": "gptq",
        }
    if fmt == "fp8_block":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    if fmt == "fbgemm_fp8":
        return {
            "quant_method": "fbgemm_fp8",
            "activation_scale_ub": 1200.0,
            "modules_to_not_convert": ["lm_head"],
        }
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**fp8, "strategy": strategy, "dynamic": False},
                "input_activations": {
                    **fp8,
                    "strategy": "tensor" if static else "token",
                    "dynamic": not static,
                },
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": {**fp8, "strategy": "tensor", "dynamic": False} if kv else None,
    }


@dataclass(frozen=True)
class Calibration:
    """What the quantizer does before rounding (quantize_checkpoint's calibration= names, CALIBRATIONS)."""

    awq: str | None = None  # int4 AWQ (awq.py): "clip" (scales + clip), "asym" (asymmetric clip), "scale"
    smooth: bool = False  # fp8 SmoothQuant scales folded in (models/smoothquant.py)
    # GPTQ rounding, Hessians from "sampled" (self-sampled), "text" (8 windows of the calibration text) or "more"
    # (all 11 of its 512-token windows and 8 self-sampled ones: 2.4x the tokens)
    gptq: str | None = None
    sequential: bool = False  # GPTQ layer by layer on the already-quantized layers' outputs (gptq_sequential.py)
    mse: bool = False  # int4 GPTQ with static groups whose levels are searched (gptq.search_group_params)
    static_inputs: bool = False  # fp8: static per-tensor input_scale per projection, max|x| of the calibration
    refit: bool = False  # int4 GPTQ: scales re-fitted to the final integers (gptq.refit_scales)
    asymmetric: bool = False  # sequential GPTQ fitted to the float model's outputs (GPTAQ, gptq_sequential.py)
    samples: int = 8  # "more": how many self-sampled 512-token windows join the text's 11 (0: the text alone)
    damp: float | None = None  # int4 GPTQ's damping, a fraction of mean diag(H) (None: gptq.INT4_DAMP)
    text_skip: int = 0  # "more": the text's first windows left out (another draw; 11: self-sampled alone)
    sink_weight: float | None = None  # GPTQ Hessian weight of a window's first position (gptq.SINK_WEIGHT)
    awq_more: bool = False  # AWQ's scale search on GPTQ's "more" windows too (default: 8 windows of the text)
    # int4 SignRound (models/signround.py) instead of GPTQ: each decoder layer's rounding and group clips
    # learnt on 8 windows of the calibration text, layer by layer on the quantized earlier layers' outputs
    signround: SignRoundConfig | None = None
    # int4: the residual stream rotated first by an orthogonal "hadamard" or "random" Q folded into the
    # weights (models/rotation.py, seed 0); the rest runs unchanged on the rotated fp32 copy
    rotation: str | None = None
    rotate_heads: bool = False  # with rotation: each head's values rotated by a Hadamard too (v and o)


CALIBRATIONS = {
    "rtn": Calibration(),
    "awq": Calibration(awq="clip"),
    "awq-asym": Calibration(awq="asym"),
    "gptq": Calibration(gptq="sampled"),
    "gptq-text": Calibration(gptq="text"),
    "gptq-seq": Calibration(gptq="text", sequential=True),
    "gptq-mse": Calibration(gptq="text", mse=True),
    "gptq-mse-seq": Calibration(gptq="text", mse=True, sequential=True),
    "awq-gptq": Calibration(awq="asym", gptq="text"),
    "awq-scale-gptq": Calibration(awq="scale", gptq="text"),
    "awq-scale-gptq-mse-seq": Calibration(awq="scale", gptq="text", mse=True, sequential=True),
    "awq-scale-gptq-mse-seq-refit": Calibration(
        awq="scale", gptq="text", mse=True, sequential=True, refit=True
    ),
    "awq-scale-gptq-mse-seq-more": Calibration(awq="scale", gptq="more", mse=True, sequential=True),
    # 2026-12-01 (fifteenth session, self-sampled windows fixed; none beat the recipe): AWQ's scale search on
    # the "more" windows too; all 11 text windows, no self-sampled ones
    "awq-scale-gptq-mse-seq-more-awq": Calibration(
        awq="scale", gptq="more", mse=True, sequential=True, awq_more=True
    ),
    "awq-scale-gptq-mse-seq-text11": Calibration(
        awq="scale", gptq="more", mse=True, sequential=True, samples=0
    ),
    # the recipe on another 8 of the text's windows (3-10), AWQ's scales too: the spread of one draw
    "awq-scale-gptq-mse-seq-text3to10": Calibration(
        awq="scale", gptq="more", mse=True, sequential=True, samples=0, text_skip=3, awq_more=True
    ),
    # data-free: AWQ and GPTQ on 8 self-sampled windows alone (4,096 tokens, as many as the text's 8)
    "awq-scale-gptq-mse-seq-sampled8": Calibration(
        awq="scale", gptq="more", mse=True, sequential=True, text_skip=11, awq_more=True
    ),
    # the attention sink's keys and values are read by every later token: its Hessian weight 8 tokens, not 1
    # (fifteenth session: +10.66%, within the recipe's spread)
    "awq-scale-gptq-mse-seq-sink8": Calibration(
        awq="scale", gptq="text", mse=True, sequential=True, sink_weight=8.0
    ),
    "awq-scale-gptaq-mse-seq": Calibration(
        awq="scale", gptq="text", mse=True, sequential=True, asymmetric=True
    ),
    "awq-scale-gptaq-mse-seq-more": Calibration(
        awq="scale", gptq="more", mse=True, sequential=True, asymmetric=True
    ),
    # 2026-12-02 (eighteenth session): SignRound, 200 signed-gradient steps of one 512-token window per layer
    "signround": Calibration(signround=SignRoundConfig()),
    "awq-scale-signround": Calibration(awq="scale", signround=SignRoundConfig()),
    # each layer fitted to the float layer on the quantized stream (its own error only, as gptq-seq), not to
    # the float model's stream (AutoRound's default, above)
    "awq-scale-signround-local": Calibration(awq="scale", signround=SignRoundConfig(float_target=False)),
    # 2026-12-02 (rotation session): the recipe, and GPTQ alone, on a rotated residual stream (rotation.py)
    "rot-hadamard-awq-scale-gptq-mse-seq": Calibration(
        awq="scale", gptq="text", mse=True, sequential=True, rotation="hadamard"
    ),
    "rot-random-awq-scale-gptq-mse-seq": Calibration(
        awq="scale", gptq="text", mse=True, sequential=True, rotation="random"
    ),
    "rot-hadamard-heads-awq-scale-gptq-mse-seq": Calibration(
        awq="scale", gptq="text", mse=True, sequential=True, rotation="hadamard", rotate_heads=True
    ),
    "rot-hadamard-gptq-mse-seq": Calibration(gptq="text", mse=True, sequential=True, rotation="hadamard"),
    "gptq-static": Calibration(gptq="text", static_inputs=True),
    "smooth": Calibration(smooth=True),
    "smooth-gptq": Calibration(smooth=True, gptq="text"),
    "smooth-gptq-seq": Calibration(smooth=True, gptq="text", sequential=True),
    "smooth-gptq-static": Calibration(smooth=True, gptq="text", static_inputs=True),
    "gptq-seq-static": Calibration(gptq="text", sequential=True, static_inputs=True),
    "smooth-gptq-seq-static": Calibration(smooth=True, gptq="text", sequential=True, static_inputs=True),
}


def quantize_checkpoint(
    src: str,
    dst: str,
    fmt: str,
    group_size: int = 128,
    desc_act: bool = False,
    strategy: str = "channel",
    input_scale: float | None = None,
    kv_scale: float | None = None,
    calibration: str = "rtn",
    smooth_alpha: float | None = None,
    signround_log=None,
) -> str:
    """Write the quantized copy of the HF folder src to dst (see the module docstring); returns dst.
    calibration (CALIBRATIONS): int4: "rtn" rounds to nearest; "awq" folds AWQ's activation-aware scales and
    clips (models/awq.py, on the shipped calibration text) before rounding to nearest ("awq-asym": the clip
    searches the group's two ends apart); "gptq" runs GPTQ (models/gptq.py) with Hessians from text the model
    samples itself, and act-order by the Hessian's diagonal; "gptq-text" the same with Hessians from the
    shipped calibration text (models/calibration.py); "-seq" layer by layer on the quantized earlier layers'
    outputs (models/gptq_sequential.py); "-mse" static groups with searched levels; "awq-gptq" folds AWQ's
    scales and asymmetric clips, then rounds with GPTQ (Hessians of the scaled model on the calibration text),
    as production pipelines chain them ("awq-scale-gptq": AWQ's scales only, GPTQ rounds). GPTQ also
    rounds compressed-tensors per-channel FP8 weights (error feedback onto the e4m3 grid); for them "smooth"
    folds SmoothQuant's scales first (models/smoothquant.py, alpha smooth_alpha) and "-static" writes each
    projection's static input_scale from the calibration text's max|x| (instead of dynamic per-token).
    "signround" learns int4 roundings per decoder layer (models/signround.py; "awq-scale-signround" after
    AWQ's scales); signround_log(layer, info) hears each layer's losses and seconds. "rot-..." rotates the
    residual stream by an orthogonal matrix folded into the weights first (models/rotation.py; the written
    checkpoint has an untied lm_head)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r} ({', '.join(CALIBRATIONS)})")
    cal = CALIBRATIONS[calibration]
    int4 = fmt in ("awq", "gptq")
    if (cal.smooth or cal.static_inputs) and fmt != "compressed-tensors":
        raise ValueError(f"calibration {calibration!r} is for fp8 (compressed-tensors) checkpoints, not {fmt}")
    if (cal.awq or cal.mse or cal.refit or cal.signround or cal.rotation) and not int4:
        raise ValueError(f"calibration {calibration!r} is for int4 (awq, gptq) checkpoints, not {fmt}")
    args = (dst, fmt, group_size, desc_act, strategy, input_scale, kv_scale, cal, smooth_alpha, signround_log)
    if cal.rotation:
        from meshserve.models.rotation import rotate_checkpoint

        with tempfile.TemporaryDirectory() as tmp:  # the rotated fp32 copy is the source from here on
            return _quantize(rotate_checkpoint(src, tmp, cal.rotation, heads=cal.rotate_heads), *args)
    return _quantize(src, *args)


def _quantize(
    src: str,
    dst: str,
    fmt: str,
    group_size: int,
    desc_act: bool,
    strategy: str,
    input_scale: float | None,
    kv_scale: float | None,
    cal: Calibration,
    smooth_alpha: float | None,
    signround_log,
) -> str:
    """quantize_checkpoint's work once its arguments are checked (src: the folder to quantize, maybe a
    rotated copy)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    int4 = fmt in ("awq", "gptq")
    os.makedirs(dst, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(src):
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    gptq_fp8 = fmt == "compressed-tensors" and strategy == "channel"
    ids = None  # GPTQ's calibration windows ("more" samples them first: AWQ may search its scales on them)
    if cal.gptq == "more" and (int4 or gptq_fp8):
        from meshserve.models.calibration import calibration_text_ids
        from meshserve.models.gptq import calibration_ids

        ids = calibration_text_ids(src)[cal.text_skip :]
        ids += calibration_ids(src, num_sequences=cal.samples, length=511) if cal.samples else []
    if cal.awq and int4:
        from meshserve.models.awq import awq_transform

        tensors = awq_transform(
            src,
            tensors,
            group_size,
            min_zero=int(fmt == "gptq"),
            clip=cal.awq != "scale",
            asymmetric_clip=cal.awq == "asym",
            token_ids=ids if cal.awq_more else None,
        )
    input_scales: dict[str, float] = {}
    if (cal.smooth or cal.static_inputs) and fmt == "compressed-tensors":
        from meshserve.models.smoothquant import DEFAULT_ALPHA, smooth_transform

        alpha = DEFAULT_ALPHA if smooth_alpha is None else smooth_alpha
        alpha = alpha if cal.smooth else None  # None: the static input scales alone
        smoothed, input_scales = smooth_transform(src, tensors, alpha, inner=cal.smooth)
        if cal.smooth:
            tensors = smoothed
        if not cal.static_inputs:
            input_scales = {}
    hessians: dict[str, torch.Tensor] = {}
    done: dict[str, dict[str, torch.Tensor]] = {}  # sequential GPTQ's checkpoint tensors per module
    min_zero = int(fmt == "gptq")
    if cal.gptq and (int4 or gptq_fp8):
        from meshserve.models.calibration import calibration_text_ids
        from meshserve.models.gptq import (
            INT4_DAMP,
            SINK_WEIGHT,
            calibration_ids,
            collect_hessians,
            gptq_fp8_quantize,
            gptq_quantize,
        )

        names = {n[: -len(".weight")] for n in tensors if is_projection(n)}
        damp = INT4_DAMP if cal.damp is None else cal.damp
        sink = SINK_WEIGHT if cal.sink_weight is None else cal.sink_weight
        if ids is None:
            ids = calibration_ids(src) if cal.gptq == "sampled" else calibration_text_ids(src, max_windows=8)
        # after AWQ / SmoothQuant the projections see x / s: the Hessians come from the scaled copy
        scaled = tensors if cal.awq or cal.smooth else None
        if cal.sequential:
            from meshserve.models.gptq import int4_dequant
            from meshserve.models.gptq_sequential import sequential_quantize

            def quantize(name, weight, hessian):
                if int4:
                    qw = gptq_quantize(weight, hessian, group_size, desc_act, min_zero,
                                       mse=cal.mse, refit=cal.refit, damp=damp)
                    return pack_int4(qw, fmt), int4_dequant(qw)
                w8, scale = gptq_fp8_quantize(weight, hessian)
                return {"weight": w8, "weight_scale": scale[:, None]}, w8.float() * scale[:, None]

            done = sequential_quantize(
                src, ids, quantize, state_dict=scaled, asymmetric=cal.asymmetric, damp=damp, sink_weight=sink
            )
        else:
            hessians = collect_hessians(src, ids, names, state_dict=scaled, sink_weight=sink)
    if cal.signround and int4:
        from meshserve.models.calibration import calibration_text_ids
        from meshserve.models.signround import signround_quantize

        # SignRound's groups are plain (g_idx = k // G) whatever desc_act says: it has no visiting order
        log = signround_log or (lambda i, info: print(f"signround layer {i}: {info}", file=sys.stderr))
        rounded = signround_quantize(src, calibration_text_ids(src, max_windows=8), group_size, min_zero,
                                     cal.signround, state_dict=tensors if cal.awq else None, log=log)
        done = {name: pack_int4(qw, fmt) for name, qw in rounded.items()}
    out: dict[str, torch.Tensor] = {}
    num_layers = 0
    extra = _MLA_PROJECTIONS + _MIXTRAL_EXPERTS if fmt == "fp8_block" else ()
    for name, tensor in tensors.items():
        if not is_projection(name, extra):
            out[name] = tensor
            continue
        num_layers = max(num_layers, int(name.split(".")[2]) + 1)
        base = name[: -len(".weight")]
        if done:
            parts = dict(done[base])
        elif hessians and gptq_fp8:
            weight, scale = gptq_fp8_quantize(tensor, hessians[base])
            parts = {"weight": weight, "weight_scale": scale[:, None]}
        elif hessians:
            qw = gptq_quantize(tensor, hessians[base], group_size, desc_act, min_zero,
                               mse=cal.mse, refit=cal.refit, damp=damp)
            parts = pack_int4(qw, fmt)
        elif fmt in ("awq", "gptq"):
            perm = None
            if desc_act:  # projections that read the same input share one order
                siblings = _SHARED_INPUT.get(base.rsplit(".", 1)[-1], ())
                prefix = base.rsplit(".", 1)[0]
                perm = act_order([tensors[f"{prefix}.{s}.weight"] for s in siblings] or [tensor])
            parts = int4_tensors(tensor, fmt, group_size, desc_act, perm)
        elif fmt == "fp8_block":
            weight, scale_inv = quantize_fp8_blockwise(tensor)
            parts = {"weight": weight, "weight_scale_inv": scale_inv}
        else:
            parts = fp8_tensors(tensor, fmt, strategy, input_scale)
        if fmt == "compressed-tensors" and (done or hessians):
            if input_scale is not None:
                parts["input_scale"] = torch.tensor([float(input_scale)])
        if base in input_scales:
            parts["input_scale"] = torch.tensor([input_scales[base]])
        out.update({f"{base}.{suffix}": t.contiguous() for suffix, t in parts.items()})
    if kv_scale is not None:
        for i in range(num_layers):
            out[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(float(kv_scale))
            out[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(float(kv_scale))
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = _quant_config(
        fmt, group_size, desc_act, strategy, input_scale is not None or bool(input_scales), kv_scale is not None
    )
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(src):  # tokenizer and generation config travel with the weights
        if name.endswith((".json", ".model", ".txt")) and name not in (
            "config.json",
            "model.safetensors.index.json",
        ):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return dst
