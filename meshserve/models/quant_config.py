"""Which checkpoint weight formats load (no torch: the argument checks read it before anything heavy).

Only unquantized checkpoints load so far. A quantized one (DeepSeek-V3's block-wise FP8 with 128 x 128 weight
scales, GPTQ, AWQ, ...) is refused in one line instead of failing on its first scale tensor; dummy weights
ignore the quantization and are drawn in the model dtype at the real shapes.
"""

from __future__ import annotations

from meshserve.errors import ModelLoadError


def check_weight_format(quantization_config, model: str, load_format: str) -> None:
    """Raise ModelLoadError for a quantized checkpoint this engine cannot read yet."""
    if not quantization_config or load_format == "dummy":
        return
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method", "unknown")
        block = quantization_config.get("weight_block_size")
    else:
        method = getattr(quantization_config, "quant_method", "unknown")
        block = getattr(quantization_config, "weight_block_size", None)
    what = f"{method} ({'x'.join(map(str, block))} block scales)" if block else str(method)
    raise ModelLoadError(f"{model}: {what} quantized checkpoints are not supported yet; use a bf16 checkpoint "
                         "or --load-format dummy")
