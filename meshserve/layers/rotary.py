"""Rotary position embedding (default, and every scaled variant transformers knows, e.g. llama3)."""

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


def compute_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling factor, exactly as transformers computes them."""
    params = _rope_parameters(hf_config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        base = float(params.get("rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq, 1.0
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
