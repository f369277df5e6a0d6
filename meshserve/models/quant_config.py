"""Which checkpoint weight formats load (no torch: the argument checks read it before anything heavy).

The formats layers/quantization reads: compressed-tensors FP8, fbgemm_fp8, HF "fp8" with per-tensor or
per-channel scales or 128 x 128 block scales (DeepSeek-V3, Qwen3 FP8), AWQ and GPTQ 4-bit. Others (other block
sizes, other methods) are refused in one line before anything loads; layers/quantization checks the details
(activation scheme, TP splits). Dummy weights ignore the checkpoint's format unless --quantization asks for one.
"""

from __future__ import annotations

from meshserve.errors import ModelLoadError

READABLE_METHODS = ("compressed-tensors", "fbgemm_fp8", "fp8", "awq", "gptq")
READABLE_BLOCKS = ([128, 128],)  # fp8 weight_block_size


def check_weight_format(quantization_config, model: str, load_format: str) -> None:
    """Raise ModelLoadError for a quantized checkpoint this engine cannot read."""
    if not quantization_config or load_format == "dummy":
        return
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method", "unknown")
        block = quantization_config.get("weight_block_size")
    else:
        method = getattr(quantization_config, "quant_method", "unknown")
        block = getattr(quantization_config, "weight_block_size", None)
    if str(method).lower() in READABLE_METHODS and not block:
        return
    if str(method).lower() == "fp8" and list(block) in [list(b) for b in READABLE_BLOCKS]:
        return
    what = f"{method} ({'x'.join(map(str, block))} block scales)" if block else str(method)
    raise ModelLoadError(f"{model}: {what} quantized checkpoints are not supported yet (readable: "
                         f"{', '.join(READABLE_METHODS)}; fp8 block scales 128x128); use a bf16 checkpoint or "
                         "--load-format dummy")
