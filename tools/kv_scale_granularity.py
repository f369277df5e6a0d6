"""Do per-head fp8 KV scales matter? SmolLM2-135M-Instruct (the embedded model) on the CPU path: perplexity on the
shipped evaluation text, mean |delta logprob| and greedy agreement against the unquantized cache, for an fp8 (e4m3)
cache with
  - scale 1.0 (the engine without checkpoint scales),
  - one scale per layer (K and V each), calibrated: each head's absmax / 448 on the calibration text, reduced to
    the layer's largest (what quantization/kv_scales.py does with a per-head checkpoint scale),
  - one scale per KV head, calibrated the same way (emulated around the torch backend: K and V divided by their
    head's scale before the write, the head's K scale folded into its queries and its V scale applied to its
    output, the cache itself at scale 1.0; in float32, so the emulation adds no rounding of its own).
Calibration reads models/calibration.py's text (Shakespeare), not the evaluation text.

    python tools/kv_scale_granularity.py [--model DIR] [--window 512] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

sys.path.insert(0, __file__.rsplit("/tools/", 1)[0])

from meshserve import LLM  # noqa: E402
from meshserve.bench.quant_accuracy import PROMPTS, agreement, greedy, load_text, score  # noqa: E402
from meshserve.kernels.quant_ref import FP8_MAX  # noqa: E402
from meshserve.layers.attention import Attention  # noqa: E402
from meshserve.models.calibration import calibration_text  # noqa: E402


def attention_layers(llm) -> list[Attention]:
    return [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]


class AbsMaxRecorder:
    """A backend wrapper recording each KV head's absmax of the K and V it writes."""

    def __init__(self, inner):
        self.inner = inner
        self.k = self.v = None

    def write_kv(self, key, value, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        k, v = key.float().abs().amax(dim=(0, 2)), value.float().abs().amax(dim=(0, 2))  # [Hkv]
        self.k = k if self.k is None else torch.maximum(self.k, k)
        self.v = v if self.v is None else torch.maximum(self.v, v)
        return self.inner.write_kv(key, value, kv_cache, slot_mapping, k_scale, v_scale)

    def attend(self, *args, **kwargs):
        return self.inner.attend(*args, **kwargs)


class PerHeadScales:
    """A backend wrapper giving each KV head its own K and V scale over a cache kept at scale 1.0."""

    def __init__(self, inner, k_scale: torch.Tensor, v_scale: torch.Tensor):
        self.inner, self.k_scale, self.v_scale = inner, k_scale, v_scale  # [Hkv]

    def write_kv(self, key, value, kv_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        return self.inner.write_kv(key / self.k_scale[:, None], value / self.v_scale[:, None], kv_cache,
                                   slot_mapping, 1.0, 1.0)

    def attend(self, query, kv_cache, meta, scale, sliding_window, k_scale=1.0, v_scale=1.0):
        group = query.shape[1] // self.k_scale.shape[0]
        per_q_head = torch.repeat_interleave  # KV head h serves query heads h * group .. (h + 1) * group - 1
        q = query * per_q_head(self.k_scale, group)[:, None]
        out = self.inner.attend(q, kv_cache, meta, scale, sliding_window, 1.0, 1.0)
        return out * per_q_head(self.v_scale, group)[:, None]


def calibrate(model: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's per-head (K absmax, V absmax) / FP8_MAX over the calibration text (16-bit-free: float32)."""
    llm = LLM(model, dtype="float32")
    layers = attention_layers(llm)
    for a in layers:
        a.backend = AbsMaxRecorder(a.backend)
    ids = llm.get_tokenizer()(calibration_text())["input_ids"]
    score(llm, [ids[i : i + 512] for i in range(0, len(ids) - 1, 512)])
    scales = [(a.backend.k / FP8_MAX, a.backend.v / FP8_MAX) for a in layers]
    llm.shutdown()
    return scales


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a model folder or GGUF (default: the embedded SmolLM2)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=48)
    ns = ap.parse_args(argv)
    if ns.model is None:
        from meshserve.models.embedded import resolve_default_model

        ns.model = str(resolve_default_model())
    scales = calibrate(ns.model)
    spread = [float(k.max() / k.min()) for k, _ in scales] + [float(v.max() / v.min()) for _, v in scales]
    print(f"per-head scale spread (largest / smallest head of a layer, K and V): median "
          f"{sorted(spread)[len(spread) // 2]:.1f}x, max {max(spread):.1f}x", file=sys.stderr)

    base = LLM(ns.model, dtype="float32")
    tok = base.get_tokenizer()
    ids = tok(load_text())["input_ids"]
    windows = [ids[i : i + ns.window] for i in range(0, len(ids) - 1, ns.window)]
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    base_lp, base_gen = score(base, windows), greedy(base, prompts, ns.max_tokens)
    base.shutdown()
    ppl = math.exp(-sum(base_lp) / len(base_lp))
    rows = [("float32 cache (reference)", ppl, 0.0, 1.0)]

    def per_layer(llm):
        for a, (k, v) in zip(attention_layers(llm), scales):
            a.k_scale, a.v_scale = float(k.max()), float(v.max())

    def per_head(llm):
        for a, (k, v) in zip(attention_layers(llm), scales):
            a.backend = PerHeadScales(a.backend, k, v)

    for name, setup in (("fp8 cache, scale 1.0", None), ("fp8 cache, one calibrated scale a layer", per_layer),
                        ("fp8 cache, a calibrated scale per KV head", per_head)):
        llm = LLM(ns.model, dtype="float32", kv_cache_dtype="fp8")
        if setup is not None:
            setup(llm)
        lp = score(llm, windows)
        rows.append((name, math.exp(-sum(lp) / len(lp)), sum(abs(a - b) for a, b in zip(lp, base_lp)) / len(lp),
                     agreement(greedy(llm, prompts, ns.max_tokens), base_gen)))
        llm.shutdown()
        print(f"{name}: perplexity {rows[-1][1]:.3f}", file=sys.stderr, flush=True)
    print(f"| fp8 KV scales ({len(base_lp)} tokens) | perplexity | vs float32 cache | mean abs Δ logprob | "
          f"greedy agreement ({len(prompts)} prompts x {ns.max_tokens}) |")
    print("|---|---|---|---|---|")
    for name, p, d, agree in rows:
        print(f"| {name} | {p:.3f} | {p / ppl - 1:+.2%} | {d:.4f} | {agree:.1%} |")


if __name__ == "__main__":
    main()
