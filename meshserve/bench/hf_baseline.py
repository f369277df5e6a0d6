"""HF transformers on the same GPU, as the baseline each benchmark measures in the same run."""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger(__name__)


def hf_model_from_config(hf_config, dtype=torch.bfloat16, device="cuda", attn_implementation="sdpa"):
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


@torch.inference_mode()
def hf_w1_tok_per_s(model, prompt: list[int], new_tokens: int, static_cache: bool = True) -> float:
    """Batch-1 greedy decode tok/s; the static cache makes transformers compile its forward."""
    ids = torch.tensor([prompt], device=model.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                  pad_token_id=0)
    if static_cache:
        kwargs["cache_implementation"] = "static"
    for _ in range(2):  # warm-up (compilation)
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t)


def hf_continuous_batching_tok_per_s(model, prompts: list[list[int]], max_new_tokens: int) -> float:
    """Output tok/s through transformers' continuous batching (generate_batch with paged attention).

    Not under inference_mode: generate_batch runs its loop in a thread that updates cache tensors in place,
    which inference tensors made here would forbid."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, num_blocks=4096,
                           max_batch_tokens=2048)
    model.generate_batch(inputs=prompts[:4], generation_config=cfg)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=cfg)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    n = sum(len(getattr(r, "generated_tokens", None) or []) for r in out.values())
    if n == 0:
        raise RuntimeError(f"generate_batch produced no tokens ({len(out)} results)")
    return n / dt


@torch.inference_mode()
def hf_padded_batches_tok_per_s(model, prompts: list[list[int]], max_new_tokens: int, batch: int = 64) -> float:
    """Output tok/s of plain `generate` over left-padded batches (the fallback baseline)."""
    def run(chunk):
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        return (out.shape[1] - width) * len(chunk)

    run(prompts[:2])  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = sum(run(prompts[i : i + batch]) for i in range(0, len(prompts), batch))
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t)
