"""Accuracy of quantized weights and KV cache on a real model, through the engine (LLM), against the unquantized run.

For each variant: perplexity over a fixed public-domain text shipped in the package (bench/data/, ~2.6k
SmolLM2 tokens; windows of `window` tokens scored from their own start, the same windows for every variant), the
mean |difference| of the text tokens' log-probabilities from the baseline's, and greedy agreement: the share of
generated tokens, over a fixed prompt set, that match the baseline's before the first divergence.

INT4 variants are made by meshserve's own quantizer (models/quantize_checkpoint.py: round-to-nearest, AWQ
calibrated on the shipped calibration text (models/calibration.py: Shakespeare, not the evaluation text), or
GPTQ calibrated on text the model samples itself) into AWQ and GPTQ checkpoints in a temporary folder, so the
loader and kernels run on real packed numbers; so is the GPTQ-rounded FP8 compressed-tensors checkpoint.

    python -m meshserve.bench.quant_accuracy [--model DIR] [--dtype float32] [--group-size 64] [--with-gptq]
        [--with-calibrated] [--only NAME-PART]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain why the sky is blue.",
    "List three prime numbers:",
    "Once upon a time, in a small village,",
    "The theory of relativity states that",
    "Translate to French: Good morning, how are you?",
]


@dataclass
class Variant:
    name: str
    kwargs: dict  # LLM keyword arguments beyond the model (quantization, kv_cache_dtype)
    fmt: str | None = None  # a checkpoint format to write with the quantizer ("awq", "gptq", "compressed-tensors")
    calibration: str = "rtn"  # the quantizer's calibration (quantize_checkpoint)
    desc_act: bool = False
    quantizer_kwargs: dict = field(default_factory=dict)  # more quantize_checkpoint arguments


VARIANTS = [
    Variant("fp8 weights (online)", {"quantization": "fp8"}),
    Variant("fp8 KV cache", {"kv_cache_dtype": "fp8"}),
    Variant("fp8 weights + fp8 KV", {"quantization": "fp8", "kv_cache_dtype": "fp8"}),
    Variant("int4 AWQ", {}, "awq"),
    Variant("int4 GPTQ", {}, "gptq"),
    Variant("int4 GPTQ act-order", {}, "gptq", desc_act=True),
]
def _fp8(name: str, calibration: str, alpha: float | None = None) -> Variant:
    """A per-channel fp8 compressed-tensors checkpoint written with calibration (SmoothQuant's alpha)."""
    kwargs = {} if alpha is None else {"smooth_alpha": alpha}
    return Variant(f"fp8 weights, {name}", {}, "compressed-tensors", calibration, quantizer_kwargs=kwargs)


# calibrated on the shipped calibration text (models/calibration.py: Shakespeare, not the evaluation text):
# ~15-25 min more on a shared CPU (--with-calibrated)
TEXT_CALIBRATED = [
    Variant("int4 AWQ, AWQ-calibrated", {}, "awq", "awq"),
    Variant("int4 AWQ, AWQ-calibrated, asymmetric clip", {}, "awq", "awq-asym"),
    Variant("int4 GPTQ, GPTQ-calibrated on the text", {}, "gptq", "gptq-text"),
    Variant("int4 GPTQ, AWQ-scaled then GPTQ-rounded", {}, "gptq", "awq-gptq"),
    Variant("fp8 weights (compressed-tensors, GPTQ-calibrated)", {}, "compressed-tensors", "gptq-text"),
    # 2026-12-01: the fp8 and int4 calibrations the first table left alone (QUANTIZATION.md)
    *(_fp8(f"SmoothQuant a={a} + GPTQ", "smooth-gptq", a) for a in (0.5, 0.65, 0.8)),
    _fp8("GPTQ, static per-tensor input scales", "gptq-static"),
    _fp8("SmoothQuant a=0.5 + GPTQ, static per-tensor input scales", "smooth-gptq-static", 0.5),
    _fp8("sequential GPTQ", "gptq-seq"),
    _fp8("sequential GPTQ, static per-tensor input scales", "gptq-seq-static"),
    _fp8(
        "SmoothQuant a=0.5 + sequential GPTQ, static per-tensor input scales", "smooth-gptq-seq-static", 0.5
    ),
    _fp8("SmoothQuant a=0.5 + sequential GPTQ", "smooth-gptq-seq", 0.5),
    Variant("int4 GPTQ, searched static group levels", {}, "gptq", "gptq-mse"),
    Variant(
        "int4 GPTQ, AWQ scales then sequential GPTQ, searched static group levels",
        {},
        "gptq",
        "awq-scale-gptq-mse-seq",
    ),
    Variant(
        "int4 GPTQ act-order, AWQ scales then sequential GPTQ, searched static group levels",
        {},
        "gptq",
        "awq-scale-gptq-mse-seq",
        desc_act=True,
    ),
    Variant("int4 GPTQ, sequential", {}, "gptq", "gptq-seq"),
    Variant("int4 GPTQ, AWQ scales (no clip) then GPTQ-rounded", {}, "gptq", "awq-scale-gptq"),
    Variant("int4 GPTQ act-order, GPTQ-calibrated on the text", {}, "gptq", "gptq-text", desc_act=True),
    Variant("int4 GPTQ, searched static group levels, sequential", {}, "gptq", "gptq-mse-seq"),
    # 2026-12-01 (fourteenth session): the act-order chain with one change each (QUANTIZATION.md)
    *(
        Variant(
            f"int4 GPTQ act-order, AWQ scales then sequential GPTQ, searched static group levels, {what}",
            {},
            "gptq",
            calibration,
            desc_act=True,
        )
        for what, calibration in (
            ("scales refit", "awq-scale-gptq-mse-seq-refit"),
            ("GPTAQ's asymmetric target", "awq-scale-gptaq-mse-seq"),
            ("2.4x the calibration tokens", "awq-scale-gptq-mse-seq-more"),
            ("GPTAQ's asymmetric target, 2.4x the calibration tokens", "awq-scale-gptaq-mse-seq-more"),
            # fifteenth session (self-sampled windows fixed; "2.4x the calibration tokens" above now runs on them)
            ("2.4x the tokens, AWQ's scales searched on them too", "awq-scale-gptq-mse-seq-more-awq"),
            ("all 11 text windows, none self-sampled", "awq-scale-gptq-mse-seq-text11"),
            ("text windows 3-10 for AWQ and GPTQ", "awq-scale-gptq-mse-seq-text3to10"),
            ("8 self-sampled windows alone for AWQ and GPTQ", "awq-scale-gptq-mse-seq-sampled8"),
            ("the attention sink weighted 8 in GPTQ's Hessians", "awq-scale-gptq-mse-seq-sink8"),
        )
    ),
    # 2026-12-02 (eighteenth session): SignRound's learnt rounding instead of GPTQ (models/signround.py)
    Variant("int4 SignRound (sequential, learnt rounding and clips)", {}, "gptq", "signround"),
    Variant("int4 AWQ scales then SignRound (sequential, learnt rounding and clips)", {}, "gptq",
            "awq-scale-signround"),
    Variant("int4 AWQ scales then SignRound, each layer fitted on the quantized stream", {}, "gptq",
            "awq-scale-signround-local"),
    # 2026-12-02 (rotation session): the residual stream rotated by an orthogonal matrix folded into the
    # weights first (models/rotation.py; an untied fp32 lm_head), then the act-order recipe or GPTQ alone
    *(
        Variant(f"int4 GPTQ act-order, {what}", {}, "gptq", calibration, desc_act=True)
        for what, calibration in (
            ("Hadamard-rotated, AWQ scales then sequential GPTQ, searched static group levels",
             "rot-hadamard-awq-scale-gptq-mse-seq"),
            ("randomly rotated, AWQ scales then sequential GPTQ, searched static group levels",
             "rot-random-awq-scale-gptq-mse-seq"),
            ("Hadamard-rotated with per-head value rotation, AWQ scales then sequential GPTQ, searched static "
             "group levels", "rot-hadamard-heads-awq-scale-gptq-mse-seq"),
            ("Hadamard-rotated, sequential GPTQ, searched static group levels", "rot-hadamard-gptq-mse-seq"),
        )
    ),
]
# GPTQ calibrated on self-sampled text: several minutes more on a CPU (--with-gptq)
CALIBRATED = [
    Variant("int4 GPTQ, GPTQ-calibrated", {}, "gptq", "gptq"),
    Variant("int4 GPTQ act-order, GPTQ-calibrated", {}, "gptq", "gptq", desc_act=True),
]


def load_text() -> str:
    return resources.files("meshserve.bench").joinpath("data/perplexity_text.txt").read_text()


def score(llm, windows: list[list[int]]) -> list[float]:
    """Log-probabilities of every token after the first of each window."""
    from meshserve.sampling import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    return [
        pos[tok].logprob for out, w in zip(outs, windows) for pos, tok in zip(out.prompt_logprobs[1:], w[1:])
    ]


def greedy(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from meshserve.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of tokens matching before each sequence's first divergence."""
    total = matched = 0
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
        matched, total = matched + n, total + len(x)
    return matched / max(total, 1)


def run(
    model_dir: str,
    dtype: str,
    group_size: int,
    window: int,
    max_tokens: int,
    variants=VARIANTS,
    target_dtype: str | None = "bfloat16",
) -> list[dict]:
    """The table's rows: the reference (dtype: every variant runs in it; the Δ logprob and greedy agreement
    are against it), then the target baseline (the issue's targets are against bf16: the engine's plain
    16-bit path on the same text), then each variant. ppl_delta is against the reference, target_delta
    against the target baseline (the reference when target_dtype is None or equal to dtype)."""
    from meshserve import LLM
    from meshserve.models.quantize_checkpoint import quantize_checkpoint

    base = LLM(model_dir, dtype=dtype)
    tok = base.get_tokenizer()
    ids = tok(load_text())["input_ids"]
    windows = [ids[i : i + window] for i in range(0, len(ids) - 1, window)]
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    base_lp = score(base, windows)
    base_gen = greedy(base, prompts, max_tokens)
    del base
    rows = [
        {
            "variant": f"{dtype} (reference)",
            "ppl": math.exp(-sum(base_lp) / len(base_lp)),
            "dlogprob": 0.0,
            "agree": 1.0,
            "tokens": len(base_lp),
        }
    ]

    def measure(name: str, llm) -> dict:
        lp = score(llm, windows)
        row = {
            "variant": name,
            "ppl": math.exp(-sum(lp) / len(lp)),
            "dlogprob": sum(abs(a - b) for a, b in zip(lp, base_lp)) / len(lp),
            "agree": agreement(greedy(llm, prompts, max_tokens), base_gen),
        }
        print(  # progress: each row as it is measured (a long run can be stopped without losing them)
            f"{name}: perplexity {row['ppl']:.3f} (reference {rows[0]['ppl']:.3f}), mean abs Δ logprob "
            f"{row['dlogprob']:.4f}, greedy agreement {row['agree'] * 100:.1f}%",
            file=sys.stderr,
            flush=True,
        )
        return row

    if target_dtype and target_dtype != dtype:  # the baseline: the engine's plain 16-bit path
        llm = LLM(model_dir, dtype=target_dtype)
        rows.append(measure(f"{target_dtype} (target baseline)", llm))
        del llm
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            path = model_dir
            if v.fmt:
                path = quantize_checkpoint(
                    model_dir,
                    os.path.join(tmp, f"{v.fmt}-{v.calibration}-{int(v.desc_act)}-{len(rows)}"),
                    v.fmt,
                    group_size=group_size,
                    desc_act=v.desc_act,
                    calibration=v.calibration,
                    **v.quantizer_kwargs,
                )
            llm = LLM(path, tokenizer=model_dir, dtype=dtype, **v.kwargs)
            rows.append(measure(v.name + (f" (g{group_size})" if v.fmt in ("awq", "gptq") else ""), llm))
            del llm
    target = rows[1]["ppl"] if len(rows) > 1 and "(target baseline)" in rows[1]["variant"] else rows[0]["ppl"]
    for r in rows:
        r["ppl_delta"] = r["ppl"] / rows[0]["ppl"] - 1
        r["target_delta"] = r["ppl"] / target - 1
    return rows


def markdown(rows: list[dict], tokens: int) -> str:
    """Perplexity against the reference (rows[0], fp32) and against the target baseline (bf16, the issue's
    targets); Δ logprob and greedy agreement against the reference."""
    ref = rows[0]["variant"].split(" ")[0]
    tgt = next((r["variant"].split(" ")[0] for r in rows if "(target baseline)" in r["variant"]), ref)
    lines = [
        f"| variant | perplexity ({tokens} tokens) | vs {ref} | vs {tgt} (target) | mean abs Δ logprob vs {ref} "
        f"| greedy agreement vs {ref} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['ppl']:.3f} | {r['ppl_delta'] * 100:+.2f}% | {r['target_delta'] * 100:+.2f}% "
            f"| {r['dlogprob']:.4f} | {r['agree'] * 100:.1f}% |"
        )
    return "\n".join(lines)


def select_variants(variants: list[Variant], only: list[str] | None) -> list[Variant]:
    """The variants --only names: an exact name picks that variant alone (some names are prefixes of others,
    e.g. the int4 recipe's), any other part every variant whose name contains it."""
    if only is None:
        return variants
    names = {v.name for v in variants}
    return [v for v in variants if any(v.name == part if part in names else part in v.name for part in only)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--dtype", default="float32", help="the reference dtype every variant runs in")
    parser.add_argument(
        "--target-dtype", default="bfloat16", help="the targets' baseline (a plain unquantized run); 'none': off"
    )
    parser.add_argument("--group-size", type=int, default=64, help="int4 group size (SmolLM2's 576 needs 64)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--with-gptq", action="store_true", help="also GPTQ-calibrated int4 checkpoints")
    parser.add_argument(
        "--with-calibrated", action="store_true", help="also AWQ / GPTQ int4 and GPTQ fp8 from the calibration text"
    )
    parser.add_argument(
        "--only", action="append", default=None,
        help="run only the variants whose name contains this, or is exactly this (repeatable)",
    )
    ns = parser.parse_args(argv)
    model_dir = ns.model
    if model_dir is None:
        from meshserve.models.embedded import resolve_default_model

        model_dir = str(resolve_default_model())
    rows = run(
        model_dir,
        ns.dtype,
        ns.group_size,
        ns.window,
        ns.max_tokens,
        variants=select_variants(
            VARIANTS + (TEXT_CALIBRATED if ns.with_calibrated else []) + (CALIBRATED if ns.with_gptq else []), ns.only
        ),
        target_dtype=None if ns.target_dtype == "none" else ns.target_dtype,
    )
    print(markdown(rows, rows[0]["tokens"]))


if __name__ == "__main__":
    main()
