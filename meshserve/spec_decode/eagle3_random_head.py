"""A random EAGLE-3 head in the public checkpoint layout, for a target config: what the GPU runs measure a
draft step's cost with (no trained head is at hand), and what the tests load.

  python -m meshserve.spec_decode.eagle3_random_head OUT_DIR --target llama-3.1-8b [--draft-vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from meshserve.spec_decode.eagle3 import ARCHITECTURE


def random_head_tensors(
    target_hf_config,
    draft_vocab_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float = 0.05,
) -> dict[str, torch.Tensor]:
    """The head's tensors by checkpoint name: Gaussian projections, unit norms, a d2t that maps the draft
    vocabulary onto a random ascending subset of the target's, and the t2d mask of that subset."""
    c = target_hf_config
    h, vocab = c.hidden_size, c.vocab_size
    draft_vocab = draft_vocab_size or vocab
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    targets = torch.randperm(vocab, generator=g)[:draft_vocab].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[targets] = True
    return {
        "fc.weight": rand(h, 3 * h),
        "midlayer.hidden_norm.weight": torch.ones(h, dtype=dtype),
        "midlayer.input_layernorm.weight": torch.ones(h, dtype=dtype),
        "midlayer.post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
        "midlayer.self_attn.q_proj.weight": rand(heads * head_dim, 2 * h),
        "midlayer.self_attn.k_proj.weight": rand(kv_heads * head_dim, 2 * h),
        "midlayer.self_attn.v_proj.weight": rand(kv_heads * head_dim, 2 * h),
        "midlayer.self_attn.o_proj.weight": rand(h, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": rand(c.intermediate_size, h),
        "midlayer.mlp.up_proj.weight": rand(c.intermediate_size, h),
        "midlayer.mlp.down_proj.weight": rand(h, c.intermediate_size),
        "norm.weight": torch.ones(h, dtype=dtype),
        "lm_head.weight": rand(draft_vocab, h),
        "d2t": targets - torch.arange(draft_vocab),
        "t2d": t2d,
    }


def head_config(target_hf_config, draft_vocab_size: int | None = None, **extra) -> dict:
    """config.json of a head for the target, as the public checkpoints write it."""
    c = target_hf_config
    fields = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        "num_hidden_layers": 1,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "draft_vocab_size": draft_vocab_size or c.vocab_size,
        "target_hidden_size": c.hidden_size,
        "tie_word_embeddings": False,
    }
    for key in ("rope_theta", "rope_scaling", "head_dim"):
        if getattr(c, key, None) is not None:
            fields[key] = getattr(c, key)
    return {**fields, **extra}


def write_head(path: str, config: dict, tensors: dict[str, torch.Tensor], bin_format: bool = False) -> str:
    """config.json and model.safetensors (bin_format: pytorch_model.bin, as some public heads ship)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if bin_format:
        torch.save(tensors, os.path.join(path, "pytorch_model.bin"))
    else:
        save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


def main(argv: list[str] | None = None) -> int:
    from meshserve.models.loader import resolve_model_source

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument(
        "--target", required=True, help="the target: a preset (e.g. llama-3.1-8b) or a model folder"
    )
    p.add_argument(
        "--draft-vocab", type=int, default=None, help="draft vocabulary size (default: the target's)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    cfg = resolve_model_source(ns.target, load_format="dummy").hf_config
    tensors = random_head_tensors(cfg, ns.draft_vocab, ns.seed, getattr(torch, ns.dtype))
    write_head(ns.out_dir, head_config(cfg, ns.draft_vocab, torch_dtype=ns.dtype), tensors)
    print(f"wrote a random EAGLE-3 head for {ns.target} to {ns.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
