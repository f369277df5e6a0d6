"""Rotary position embedding (default, and every scaled variant transformers knows, e.g. llama3)."""

import math

import torch
from torch import nn

from meshserve.kernels.fused import fused_ops_for
from meshserve.layers.backend_selection import PLAIN
from meshserve.models.config_snapshot import as_hf_config


def _rope_parameters(hf_config) -> dict:
    # transformers >= 5 keeps theta and scaling in `rope_parameters`; 4.x used rope_theta / rope_scaling.
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _default_inv_freq(base: float, head_dim: int) -> torch.Tensor:
    """Unscaled RoPE: base^(-2i/d) for each pair of dimensions."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(params: dict, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolated (divided by `factor`) below a band of dimensions, extrapolated above it, a linear
    ramp across; cos/sin scaled by the attention factor (DeepSeek: mscale / mscale_all_dim)."""
    base, dim = params["rope_theta"], head_dim
    factor = params["factor"]
    original = params["original_max_position_embeddings"]
    if factor is None:
        factor = max_position_embeddings / original

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        attention_factor = (float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
                            if mscale and mscale_all_dim else get_mscale(factor))
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(num_rotations):  # the dimension that turns num_rotations times over `original` tokens
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, attention_factor


def compute_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling factor, exactly as transformers computes them: default,
    linear, llama3 and yarn here (the types of the models served; no transformers import on the start-up
    path), any other static type through transformers' ROPE_INIT_FUNCTIONS."""
    params = _rope_parameters(hf_config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return _default_inv_freq(float(params.get("rope_theta", 10000.0)), head_dim), 1.0
    if rope_type in ("linear", "llama3", "yarn") and params.get("partial_rotary_factor", 1.0) == 1.0:
        # transformers 5 standardises this default into the parameters; 4.x configs may lack it
        params.setdefault("original_max_position_embeddings", getattr(hf_config, "max_position_embeddings", None))
        if rope_type == "yarn":
            return _yarn_inv_freq(params, head_dim, hf_config.max_position_embeddings)
        inv_freq = _default_inv_freq(params["rope_theta"], head_dim)
        return (inv_freq / params["factor"] if rope_type == "linear" else _llama3_inv_freq(inv_freq, params)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        # dynamic NTK changes frequencies with the sequence length; a static cache cannot follow it.
        raise ValueError(f"rope type {rope_type!r} is not supported")
    # transformers' helpers call the config's methods: a rank's snapshot becomes the config object again
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](as_hf_config(hf_config), torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Applies RoPE (rotate-half convention) to q and k given absolute token positions.

    cos/sin are precomputed for every position up to max_position, so a step only gathers rows.
    """

    def __init__(self, hf_config, head_dim: int, max_position: int):
        super().__init__()
        device = torch.get_default_device()
        with torch.device("cpu"):  # transformers' rope helpers mix default-device and CPU tensors
            inv_freq, scaling = compute_inv_freq(hf_config, head_dim)
            t = torch.arange(max_position, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", (emb.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin_cache", (emb.sin() * scaling).to(device), persistent=False)
        self.kernels = PLAIN  # bound by the model runner (layers/backend_selection.py)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T]; q [T, H, D]; k [T, Hkv, D] -> rotated (q, k) in their input dtype."""
        ops = fused_ops_for(q, self.kernels.fused_ops)
        if ops is not None:
            return ops.apply_rotary(positions, q, k, self.cos_cache, self.sin_cache)
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        q = q * cos + self._rotate_half(q) * sin
        k = k * cos + self._rotate_half(k) * sin
        return q, k
