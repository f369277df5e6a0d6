"""Weight quantization: which format a model's linear layers hold, from the user's `quantization` and the
checkpoint's quantization_config.

resolve_quant_config() decides (and rejects bad combinations in one line); build_model() makes the model under
quantization_scope(config), and every linear layer created inside asks current_quant_config() for its
LinearMethod, so models never mention quantization. KV-cache scales in checkpoints (k_scale / v_scale) are
read by kv_scales.py.
"""

from __future__ import annotations

import contextlib

from meshserve.config import QUANTIZATION_METHODS
from meshserve.errors import InvalidArgumentError
from meshserve.layers.quantization.base import LinearMethod, QuantConfig, UnquantizedLinearMethod
from meshserve.layers.quantization.fp8 import Fp8Config
from meshserve.layers.quantization.fp8_block import SUPPORTED_BLOCK, Fp8BlockConfig, check_block_alignment
from meshserve.layers.quantization.int4 import Int4Config

_FP8_CHECKPOINTS = ("compressed-tensors", "fbgemm_fp8", "fp8")

_current: QuantConfig | None = None


def _error(msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"quantization: {msg}", param="quantization")


def checkpoint_quant_config(hf_config) -> dict | None:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    return dict(qc) if isinstance(qc, dict) else qc.to_dict()


def _compressed_tensors(qc: dict) -> QuantConfig:
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise _error("compressed-tensors checkpoint without config_groups")
    schemes = set()
    for group in groups:
        w, a = group.get("weights") or {}, group.get("input_activations")
        if (
            w.get("type") != "float"
            or w.get("num_bits") != 8
            or w.get("strategy") not in ("tensor", "channel")
        ):
            raise _error(
                f"compressed-tensors weight scheme {w.get('type')}{w.get('num_bits')} strategy "
                f"{w.get('strategy')} is not supported (fp8 weights, per tensor or per channel)"
            )
        if a is not None and (
            a.get("type") != "float"
            or a.get("num_bits") != 8
            or (not a.get("dynamic") and a.get("strategy") != "tensor")
        ):
            raise _error(
                f"compressed-tensors activation scheme {a} is not supported (fp8, dynamic per token "
                "or static per tensor)"
            )
        schemes.add(a is not None and not a.get("dynamic"))
    if len(schemes) > 1:
        raise _error("compressed-tensors checkpoint mixes static and dynamic activation scales")
    ignored = [name for name in qc.get("ignore") or [] if not name.split(".")[-1].startswith("lm_head")]
    if ignored:
        raise _error(f"compressed-tensors leaves layers unquantized ({ignored[0]}, ...): not supported")
    # weight-only fp8 (no input_activations) also runs with dynamic per-token activations
    return Fp8Config("compressed-tensors", static_input_scale=schemes.pop())


def _fp8_block(qc: dict) -> QuantConfig:
    """HF fp8 with weight_block_size (DeepSeek-V3, Qwen3 FP8): 128 x 128 e4m3 blocks, dynamic activations."""
    block = tuple(int(b) for b in qc["weight_block_size"])
    if block != SUPPORTED_BLOCK:
        raise _error(
            f"fp8 weight_block_size {list(block)} is not supported (block-wise fp8 loads "
            f"{list(SUPPORTED_BLOCK)} blocks only)"
        )
    if str(qc.get("fmt", "e4m3")).lower() != "e4m3":
        raise _error(f"fp8 block-wise fmt {qc.get('fmt')} is not supported (e4m3 only)")
    scheme = str(qc.get("activation_scheme", "dynamic")).lower()
    if scheme != "dynamic":
        raise _error(
            f"fp8 block-wise activation_scheme {scheme} is not supported (dynamic per-token-group only)"
        )
    skipped = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or []
    skipped = [m for m in skipped if m.split(".")[-1] not in ("lm_head", "gate")]
    if skipped:
        raise _error(
            f"fp8 block-wise checkpoint leaves layers unquantized ({skipped[0]}, ...): not supported"
        )
    return Fp8BlockConfig(block)


def _from_checkpoint(qc: dict) -> QuantConfig:
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "fbgemm_fp8":
        return Fp8Config("fbgemm_fp8", extra_optional=("input_scale_ub",))
    if method == "fp8":
        if qc.get("weight_block_size"):
            return _fp8_block(qc)
        return Fp8Config("fp8", static_input_scale=qc.get("activation_scheme", "dynamic") == "static")
    if method in ("awq", "gptq"):
        bits = qc.get("bits", qc.get("w_bit", 4))
        if bits != 4:
            raise _error(f"{method} with {bits}-bit weights is not supported (4-bit only)")
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        if method == "awq":
            if str(qc.get("version", "gemm")).lower() != "gemm" or not qc.get("zero_point", True):
                raise _error(
                    f"awq version {qc.get('version')} / zero_point {qc.get('zero_point')} is not "
                    "supported (gemm with zero points)"
                )
            return Int4Config("awq", group)
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise _error(f"gptq checkpoint_format {fmt} is not supported (gptq, gptq_v2)")
        return Int4Config(
            "gptq", group, desc_act=bool(qc.get("desc_act", False)), zero_offset=1 if fmt == "gptq" else 0
        )
    raise _error(
        f"the checkpoint's quantization {method or qc!r} is not supported ({', '.join(QUANTIZATION_METHODS)})"
    )


def resolve_quant_config(
    hf_config, quantization: str | None, load_format: str = "auto"
) -> QuantConfig | None:
    """The weight format of the model: the checkpoint's quantization_config, or online fp8 for
    quantization="fp8" on a 16-bit checkpoint. None: unquantized."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise _error(f"must be one of {', '.join(QUANTIZATION_METHODS)}, got {quantization!r}")
    qc = checkpoint_quant_config(hf_config)
    if load_format == "dummy":  # random 16-bit weights, quantized online into the asked format
        method = quantization or (str(qc.get("quant_method", "")).lower() if qc else None)
        if method in ("awq", "gptq"):  # a desc_act (act-order) GPTQ config: the input features permuted, sorted
            act_order = method == "gptq" and bool((qc or {}).get("desc_act"))
            return Int4Config(method, int((qc or {}).get("group_size", 128)), desc_act=act_order, online=True)
        if method == "fp8" and qc and qc.get("weight_block_size") and quantization in (None, "fp8"):
            return Fp8BlockConfig(_fp8_block(qc).block, online=True)  # the checkpoint's own format
        return Fp8Config("online") if method is not None else None
    if qc is None:
        if quantization in (None, "fp8"):
            return Fp8Config("online") if quantization else None
        raise _error(
            f"{quantization} needs a checkpoint whose config.json holds its quantization_config "
            "(this one has none)"
        )
    config = _from_checkpoint(qc)
    method = str(qc.get("quant_method", "")).lower()
    if (
        quantization is not None
        and quantization != method
        and not (quantization == "fp8" and method in _FP8_CHECKPOINTS)
    ):
        raise _error(f"{quantization} was asked for but the checkpoint is {method}-quantized")
    return config


def check_quant_shapes(config: QuantConfig | None, hf_config, tensor_parallel_size: int = 1) -> None:
    """One-line errors, before anything loads, for int4 groups that do not divide a rank's input features
    and fp8 weight blocks that a tensor-parallel split would cut."""
    if isinstance(config, Fp8BlockConfig):
        _check_fp8_blocks(config, hf_config, tensor_parallel_size)
        return
    if not isinstance(config, Int4Config) or config.group_size <= 0:
        return
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    inputs = {"hidden_size (q/k/v, gate/up)": hf_config.hidden_size}
    split = 1 if config.desc_act else tensor_parallel_size  # act-order ranks keep every group
    for what, full in (
        ("attention output (o_proj)", heads * head_dim),
        ("intermediate_size (down_proj)", hf_config.intermediate_size),
    ):
        inputs[what + (f" per rank at tensor parallel {split}" if split > 1 else "")] = full // split
    for what, features in inputs.items():
        if features % config.group_size:
            raise _error(
                f"{config.name} group size {config.group_size} does not divide the {features} input "
                f"features of {what}"
            )


def _check_fp8_blocks(config: Fp8BlockConfig, hf_config, tp: int) -> None:
    """The dense projections' shares per rank (layers/quantization/fp8_block.py checks every layer again as it
    is built, MLA and MoE models included)."""
    if tp <= 1 or getattr(hf_config, "kv_lora_rank", None):
        return
    from types import SimpleNamespace

    heads, kv_heads = hf_config.num_attention_heads, getattr(hf_config, "num_key_value_heads", None)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    kv_heads = kv_heads or heads
    inter = getattr(hf_config, "intermediate_size", None)
    layers = {
        "q/k/v": SimpleNamespace(
            tp_size=tp,
            output_is_parallel=True,
            num_heads=heads // tp,
            num_kv_heads=max(kv_heads // tp, 1),
            head_dim=head_dim,
        ),
        "o_proj": SimpleNamespace(tp_size=tp, input_is_parallel=True, out_features=hf_config.hidden_size),
    }
    if inter:
        layers["gate/up"] = SimpleNamespace(tp_size=tp, output_is_parallel=True, output_sizes=[inter, inter])
        layers["down_proj"] = SimpleNamespace(
            tp_size=tp, input_is_parallel=True, out_features=hf_config.hidden_size
        )
    ins = {"o_proj": heads * head_dim // tp, "down_proj": (inter or 0) // tp}
    for what, layer in layers.items():
        try:
            check_block_alignment(layer, ins.get(what, hf_config.hidden_size), 0, config.block)
        except ValueError as e:
            raise _error(f"{what}: {str(e).split(': ', 1)[1]}") from None


@contextlib.contextmanager
def quantization_scope(config: QuantConfig | None):
    """Linear layers created inside get config's LinearMethod (unquantized when None)."""
    global _current
    old, _current = _current, config
    try:
        yield
    finally:
        _current = old


def current_linear_method() -> LinearMethod:
    return _current.linear_method() if _current is not None else UnquantizedLinearMethod()


def current_quant_config() -> QuantConfig | None:
    return _current


def current_unquantized_method() -> LinearMethod:
    """The method of a layer that stays 16-bit (it may still dequantize a quantized checkpoint copy)."""
    return _current.unquantized_method() if _current is not None else UnquantizedLinearMethod()


__all__ = [
    "QUANTIZATION_METHODS",
    "LinearMethod",
    "QuantConfig",
    "check_quant_shapes",
    "current_linear_method",
    "current_quant_config",
    "current_unquantized_method",
    "quantization_scope",
    "resolve_quant_config",
]
