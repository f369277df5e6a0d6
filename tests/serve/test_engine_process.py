"""The server with its engine in a child process (the `meshserve serve` default) behaves like in-thread."""

import multiprocessing
import time

import httpx
import pytest

from meshserve.config import EngineArgs
from meshserve.engine.async_engine import AsyncLLM
from meshserve.errors import ModelLoadError
from meshserve.serve.config import ServeConfig
from tests.serve.conftest import start_server


@pytest.fixture(scope="module")
def process_server(tiny_model_dir):
    allm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model_dir("llama"), max_model_len=256, block_size=4),
                                     separate_process=True)
    live = start_server(allm, ServeConfig(served_model_names=["tiny"]))
    yield live
    live.stop()
    allm.shutdown()
    assert not allm.core_client.proc.is_alive()


def test_completion_matches_the_offline_engine(process_server, tiny_model_dir):
    from meshserve import LLM, SamplingParams

    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(process_server.v1 + "/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    offline = LLM(model=tiny_model_dir("llama")).generate(
        {"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    assert r.json()["choices"][0]["text"] == offline
    assert r.json()["usage"]["completion_tokens"] == 6


def test_streaming_and_chat(process_server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", process_server.v1 + "/chat/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and '"completion_tokens":5' in lines[-2].replace(" ", "")


def test_engine_errors_keep_their_status_and_param(process_server):
    body = {"model": "tiny", "prompt": [5] * 300, "max_tokens": 4}
    r = httpx.post(process_server.v1 + "/completions", json=body, timeout=30)
    assert r.status_code == 400 and "max_model_len" in r.json()["error"]["message"]
    body = {"model": "tiny", "prompt": [10_000], "max_tokens": 4}
    r = httpx.post(process_server.v1 + "/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_disconnect_frees_blocks_and_metrics_work(process_server):
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", process_server.v1 + "/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # leave after the first token
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(process_server.base_url + "/metrics", timeout=10).text
        running = [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running{")]
        if running and float(running[0].split()[-1]) == 0:
            break
        time.sleep(0.1)
    assert running and float(running[0].split()[-1]) == 0


def test_load_failure_is_reported(tmp_path):
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ModelLoadError, match="not found"):
        AsyncLLM.from_engine_args(EngineArgs(model=str(tmp_path / "nope")), separate_process=True)
    # the failed core process is gone too (a live one would hold up the interpreter's exit)
    assert not [p for p in multiprocessing.active_children() if p.pid not in before]
