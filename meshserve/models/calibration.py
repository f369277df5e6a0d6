"""Calibration inputs for the quantizer (AWQ, GPTQ): token windows of a shipped text, and the statistics of
every decoder projection's input over them (the diagonal blocks of the Gram matrix X^T X, one per group of
input features, and the mean and max |x| per input feature).

The shipped calibration text (bench/data/calibration_text.txt) is the opening ~20,000 characters of
Shakespeare's Coriolanus (public domain), as collected in the "tinyshakespeare" file of karpathy/char-rnn
(data/tinyshakespeare/input.txt, from Project Gutenberg). It shares nothing with the perplexity text of
bench/quant_accuracy.py (Austen, the Declaration, Lincoln, Melville), so no evaluation text leaks into the
quantizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources

import torch


@dataclass(frozen=True)
class AttentionShape:
    """A checkpoint's decoder layers and attention heads (its config.json): what the scale folds (AWQ,
    SmoothQuant) need to carry v_proj's per-row scales into o_proj's inputs."""

    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model_dir: str) -> AttentionShape:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        heads = config["num_attention_heads"]
        return cls(config["num_hidden_layers"], heads, config.get("num_key_value_heads") or heads,
                   config.get("head_dim") or config["hidden_size"] // heads)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def tie_v_to_o(self, s_v: torch.Tensor) -> torch.Tensor:
        """A scale per v_proj output row -> one per o_proj input (query head h reads KV head h // group)."""
        kv, d = self.kv_heads, self.head_dim
        return s_v.view(kv, 1, d).expand(kv, self.group, d).reshape(-1)


def calibration_text() -> str:
    return resources.files("meshserve.bench").joinpath("data/calibration_text.txt").read_text()


def calibration_text_ids(
    tokenizer_dir: str, window: int = 512, max_windows: int | None = None
) -> list[list[int]]:
    """The calibration text's token ids in full windows of `window` tokens (the shorter tail is dropped)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(calibration_text())["input_ids"]
    windows = [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]
    return windows[:max_windows] if max_windows else windows


@dataclass
class InputStats:
    """Statistics of one projection's input x [T, K] over the calibration tokens."""

    blocks: torch.Tensor  # [K / G, G, G] fp64: block g sums x_g^T x_g over tokens, x_g = x[g*G:(g+1)*G]
    abs_sum: torch.Tensor  # [K] fp64, sum over tokens of |x|
    count: int
    abs_max: torch.Tensor | None = None  # [K] fp32, max over tokens of |x| (SmoothQuant, static input scales)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


def collect_input_stats(
    model_dir: str, token_ids: list[list[int]], names: set[str], group_size: int, skip_first: bool = False
) -> dict[str, InputStats]:
    """InputStats of the input of every nn.Linear whose module name is in names, from one pass of the
    16/32-bit model (transformers, fp32). Only the Gram matrix's diagonal blocks (groups of group_size inputs)
    are kept: per group they are what a group's rounding error costs, at 1/(K/G) of the full matrix's time
    and memory. skip_first leaves out each window's first position (the attention sink, whose activations are
    orders of magnitude louder than the rest)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stats: dict[str, InputStats] = {}
    hooks = []
    for name, module in model.named_modules():
        if name in names and isinstance(module, torch.nn.Linear):

            def hook(mod, args, _out, name=name):
                x = args[0][:, int(skip_first) :].reshape(-1, args[0].shape[-1]).float()
                k = x.shape[1]
                s = stats.get(name) or InputStats(
                    torch.zeros(k // group_size, group_size, group_size, dtype=torch.float64),
                    torch.zeros(k, dtype=torch.float64),
                    0,
                    torch.zeros(k),
                )
                xg = x.view(x.shape[0], k // group_size, group_size).transpose(0, 1)  # [groups, T, G]
                s.blocks += (xg.transpose(1, 2) @ xg).double()
                s.abs_sum += x.abs().sum(dim=0).double()
                s.count += x.shape[0]
                s.abs_max = torch.maximum(s.abs_max, x.abs().amax(dim=0))
                stats[name] = s

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for ids in token_ids:
            model.model(torch.tensor([ids]))  # the decoder alone: the LM head's logits are not needed
    for h in hooks:
        h.remove()
    return stats
