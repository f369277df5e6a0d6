"""An orthogonal rotation of a Llama-style decoder's residual stream folded into its weights (QuaRot /
SpinQuant style, weight-only), so int4 rounding sees inputs whose loud features are spread over all of them.
(On SmolLM2 every rotation lost to the unrotated recipe: act-order GPTQ profits from the loud features;
QUANTIZATION.md, 2026-12-02.)

The rotated copy is an ordinary Llama checkpoint (no new runtime op) computing the same fp32 function:
  1. each RMSNorm's weight g is folded into the linears that read it (input_layernorm -> q/k/v,
     post_attention_layernorm -> gate/up, the final norm -> lm_head) and set to one;
  2. the residual stream x becomes x Q for an orthogonal Q [hidden, hidden] (x is a row vector, y = x W^T):
     embed_tokens E -> E Q; a projection reading the residual W [N, K] -> W Q; one writing it (o_proj,
     down_proj) W [K, N] -> Q^T W; lm_head -> (W_lm diag(g)) Q. A unit-weight RMSNorm commutes with Q (it
     divides by |x|, which Q keeps, eps included), so every layer sees its old inputs rotated;
  3. optionally (heads=True) v_proj's output rows of every kv head -> R W_v[h] and o_proj's matching input
     columns -> W_o[:, j] R^T, R a normalised Hadamard [head_dim, head_dim]: the attention mixes tokens, not
     features, so each head's output is R times the old one.
The embedding stays the unrotated E's shape but not its values, so a tied lm_head is written out untied
(tie_word_embeddings false); both stay unquantized in meshserve's quantizer.

Q: "random", a seeded random orthogonal matrix (QR of a Gaussian, the signs fixed by R's diagonal: Haar
distributed); "hadamard", a Hadamard matrix (Sylvester for powers of two, Paley I for q + 1 with q a prime
= 3 mod 4, Sylvester doublings of those: 576 = 8 x 72, Paley on q = 71) with seeded random column signs,
divided by sqrt(hidden).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from meshserve.models.checkpoint_files import safetensors_files

ROTATIONS = ("random", "hadamard")
_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 mod 4 (I + S, S the
    skew-symmetric bordered Jacobsthal matrix of the quadratic character mod q)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return torch.eye(q + 1, dtype=torch.float64) + s


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I) in float64, for n a power of two times a Paley
    order (q + 1, q a prime = 3 mod 4): 64, 576 (8 x 72), 768 (64 x 12), ... Others raise ValueError."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n & (n - 1) and _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley(n - 1)
    if n % 2:
        raise ValueError(f"no Hadamard construction here for order {n}")
    h = hadamard(n // 2)
    return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal [n, n] in float64: QR of a seeded Gaussian, each column's sign fixed so that
    R's diagonal is positive (without it QR's sign convention biases the distribution)."""
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation_matrix(kind: str, n: int, seed: int) -> torch.Tensor:
    """The residual rotation Q [n, n] (float64, orthogonal) of kind (ROTATIONS)."""
    if kind == "random":
        return random_orthogonal(n, seed)
    if kind == "hadamard":
        signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
        return hadamard(n) * signs[None, :] / n**0.5
    raise ValueError(f"unknown rotation {kind!r} ({', '.join(ROTATIONS)})")


def rotate_state_dict(tensors: dict[str, torch.Tensor], num_layers: int, q: torch.Tensor,
                      head_dim: int | None = None) -> dict[str, torch.Tensor]:
    """The rotated copy (module docstring) of a Llama-style state dict, every tensor fp32; q: the residual
    rotation [hidden, hidden]; head_dim: also rotate each head's values (None: not). The lm_head is written
    even when the source ties it to the embedding."""
    known = ("input_layernorm.weight", "post_attention_layernorm.weight") + tuple(
        f"{p}.weight" for p in _READERS["input_layernorm"] + _READERS["post_attention_layernorm"] + _WRITERS)
    layer_names = [n for n in tensors if n.startswith("model.layers.")]
    if other := [n for n in layer_names if n.split(".", 3)[3] not in known]:
        raise ValueError(f"rotation folds Llama's dense decoder only; unexpected tensors: {other[:3]}")
    w = {n: t.double() for n, t in tensors.items()}
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w["model.embed_tokens.weight"] @ q}
    lm_head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    out["lm_head.weight"] = (lm_head * w["model.norm.weight"][None, :]) @ q
    out["model.norm.weight"] = torch.ones_like(w["model.norm.weight"])
    head_r = hadamard(head_dim) / head_dim**0.5 if head_dim else None
    for i in range(num_layers):
        p = f"model.layers.{i}"
        for norm, readers in _READERS.items():
            g = w[f"{p}.{norm}.weight"]
            out[f"{p}.{norm}.weight"] = torch.ones_like(g)
            for r in readers:
                out[f"{p}.{r}.weight"] = (w[f"{p}.{r}.weight"] * g[None, :]) @ q
        for wr in _WRITERS:
            out[f"{p}.{wr}.weight"] = q.T @ w[f"{p}.{wr}.weight"]
        if head_r is not None:
            d = head_r.shape[0]
            v, o = out[f"{p}.self_attn.v_proj.weight"], out[f"{p}.self_attn.o_proj.weight"]
            out[f"{p}.self_attn.v_proj.weight"] = (head_r @ v.view(-1, d, v.shape[1])).reshape(v.shape)
            out[f"{p}.self_attn.o_proj.weight"] = (o.view(o.shape[0], -1, d) @ head_r.T).reshape(o.shape)
    return {n: t.float().contiguous() for n, t in out.items()}


def rotate_checkpoint(
    src: str, dst: str, rotation: str = "hadamard", seed: int = 0, heads: bool = False
) -> str:
    """Write the rotated fp32 copy of the Llama-style HF folder src to dst (tokenizer and generation config
    copied, tie_word_embeddings false); returns dst."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config.get("quantization_config"):
        raise ValueError("rotate a 16/32-bit checkpoint, not a quantized one")
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(src):
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    q = rotation_matrix(rotation, config["hidden_size"], seed)
    os.makedirs(dst, exist_ok=True)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rotated = rotate_state_dict(tensors, config["num_hidden_layers"], q, head_dim if heads else None)
    save_file(rotated, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    config.update(tie_word_embeddings=False, dtype="float32")
    config.pop("torch_dtype", None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(src):
        copied = name not in ("config.json", "model.safetensors.index.json")
        if copied and name.endswith((".json", ".model", ".txt")):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    return dst
