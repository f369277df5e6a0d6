"""tools/kv_scale_granularity.py's per-head scales, emulated around the torch backend: with every head at the
same power-of-two scale (exact in fp32) they give the engine's own per-layer scale bit for bit, and the recorder
finds each KV head's absmax."""

from __future__ import annotations

import importlib.util
import pathlib

import torch

_spec = importlib.util.spec_from_file_location(
    "kv_scale_granularity", pathlib.Path(__file__).resolve().parents[2] / "tools" / "kv_scale_granularity.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

PROMPTS = [[(7 * i + s) % 90 + 3 for i in range(40)] for s in (1, 2)]


def _logprobs(model: str, setup, kv_cache_dtype: str = "fp8") -> list[float]:
    from meshserve import LLM

    llm = LLM(model=model, dtype="float32", kv_cache_dtype=kv_cache_dtype)
    setup(llm)
    try:
        return tool.score(llm, PROMPTS)
    finally:
        llm.shutdown()


def test_equal_per_head_scales_are_the_engines_per_layer_scale(tiny_model_dir):
    model = tiny_model_dir("llama")

    def per_layer(llm):
        for a in tool.attention_layers(llm):
            a.k_scale, a.v_scale = 0.25, 2.0

    def per_head(llm):
        for a in tool.attention_layers(llm):
            n = a.num_kv_heads
            a.backend = tool.PerHeadScales(a.backend, torch.full((n,), 0.25), torch.full((n,), 2.0))

    assert _logprobs(model, per_head) == _logprobs(model, per_layer)


def test_distinct_per_head_scales_cancel_over_an_unquantized_cache(tiny_model_dir):
    # powers of two, a different one per KV head: over a float32 cache the scaling must cancel exactly, which it
    # does only if each head's scale reaches the query heads of its own group
    model = tiny_model_dir("llama")

    def per_head(llm):
        for a in tool.attention_layers(llm):
            assert a.num_heads > a.num_kv_heads > 1  # grouped queries, several KV heads: the mapping matters
            n = a.num_kv_heads
            a.backend = tool.PerHeadScales(a.backend, 2.0 ** torch.arange(n, dtype=torch.float32),
                                           2.0 ** -torch.arange(n, dtype=torch.float32))

    assert _logprobs(model, per_head, "auto") == _logprobs(model, lambda llm: None, "auto")


def test_the_recorder_keeps_each_heads_absmax():
    class Inner:
        def write_kv(self, *args):
            return None

    rec = tool.AbsMaxRecorder(Inner())
    k = torch.zeros(3, 2, 4)
    k[1, 0, 2], k[2, 1, 0] = -5.0, 3.0
    rec.write_kv(k, k * 2, None, None)
    rec.write_kv(k / 10, k, None, None)
    assert rec.k.tolist() == [5.0, 3.0] and rec.v.tolist() == [10.0, 6.0]
