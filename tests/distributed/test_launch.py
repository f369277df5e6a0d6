"""Multi-node and torchrun-style launches on loopback, and a dying rank ending the run cleanly."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from meshserve import LLM, SamplingParams
from meshserve.distributed.launch import free_port
from tests.conftest import VOCAB


def _tokens(llm) -> list[list[int]]:
    rng = random.Random(9)
    prompts = [{"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(n)]} for n in (4, 11, 23)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def single_device_tokens(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("qwen3"))
    try:
        return _tokens(llm)
    finally:
        llm.shutdown()


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "meshserve.cli", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_nodes_on_loopback(tiny_model_dir, single_device_tokens):
    path, port = tiny_model_dir("qwen3"), free_port()
    node1 = _cli("generate", "--model", path, "-tp", "2", "--nnodes", "2", "--node-rank", "1",
                 "--master-addr", "127.0.0.1", "--master-port", str(port), "--no-chat", "unused")
    try:
        llm = LLM(model=path, tensor_parallel_size=2, nnodes=2, node_rank=0, master_port=port)
        try:
            assert _tokens(llm) == single_device_tokens
        finally:
            llm.shutdown()
        assert node1.wait(timeout=60) == 0, node1.stderr.read()
    finally:
        node1.kill()


def test_torchrun_environment(tiny_model_dir, single_device_tokens, monkeypatch):
    path, port = tiny_model_dir("qwen3"), free_port()
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    rank1 = _cli("generate", "--model", path, "-pp", "2", "--no-chat", "unused", env=env)
    try:
        for key, value in {**env, "RANK": "0"}.items():
            monkeypatch.setenv(key, value)
        llm = LLM(model=path, pipeline_parallel_size=2)
        try:
            assert _tokens(llm) == single_device_tokens
        finally:
            llm.shutdown()
        assert rank1.wait(timeout=60) == 0, rank1.stderr.read()
    finally:
        rank1.kill()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_for_workers(proc: subprocess.Popen, count: int, timeout: float = 60) -> list[int]:
    """Pids of the spawned worker ranks of proc, once `count` of them run."""
    workers: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(workers) < count:
        workers = [c for c in _children(proc.pid) if "spawn_main" in _cmdline(c)]
        time.sleep(0.2)
    assert len(workers) >= count, "the worker ranks never started"
    return workers


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_worker_stops_the_run_naming_the_rank(tiny_model_dir):
    path = tiny_model_dir("llama")
    proc = _cli("generate", "--model", path, "-tp", "2", "--no-chat", "--ignore-eos", "--max-tokens", "400",
                "--distributed-timeout-s", "20", *[f"prompt {i}" for i in range(16)])
    try:
        workers = _wait_for_workers(proc, 1)
        everything = _children(proc.pid)
        time.sleep(3)  # let it load and start generating
        os.kill(workers[0], signal.SIGKILL)
        start = time.monotonic()
        rc = proc.wait(timeout=60)
        elapsed = time.monotonic() - start
        err = proc.stderr.read()
        assert rc != 0
        assert "rank 1" in err, err
        assert elapsed < 30
        time.sleep(2)
        assert not [p for p in everything if _alive(p)], "processes left behind"
    finally:
        proc.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_shuts_every_rank_down(tiny_model_dir):
    path = tiny_model_dir("llama")
    proc = _cli("generate", "--model", path, "-tp", "2", "-pp", "2", "--no-chat", "--ignore-eos",
                "--max-tokens", "400", *[f"prompt {i}" for i in range(16)])
    try:
        _wait_for_workers(proc, 3)
        everything = _children(proc.pid)
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        time.sleep(1)
        assert not [p for p in everything if _alive(p)], "processes left behind"
    finally:
        proc.kill()


@pytest.mark.slow
def test_ray_backend_on_local_instance(tiny_model_dir, single_device_tokens):
    pytest.importorskip("ray")
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        llm = LLM(model=tiny_model_dir("qwen3"), tensor_parallel_size=2, distributed_executor_backend="ray")
        try:
            assert _tokens(llm) == single_device_tokens
        finally:
            llm.shutdown()
    finally:
        ray.shutdown()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_hung_worker_is_named_within_the_timeout(tiny_model_dir):
    path = tiny_model_dir("llama")
    proc = _cli("generate", "--model", path, "-tp", "2", "--no-chat", "--ignore-eos", "--max-tokens", "400",
                "--distributed-timeout-s", "5", *[f"prompt {i}" for i in range(16)])
    try:
        workers = _wait_for_workers(proc, 1)
        everything = _children(proc.pid)
        time.sleep(3)
        os.kill(workers[0], signal.SIGSTOP)  # alive but silent
        start = time.monotonic()
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
        assert rc != 0 and "rank 1 stopped responding" in err, err
        assert time.monotonic() - start < 20
        time.sleep(1)
        assert not [p for p in everything if _alive(p)], "processes left behind"
    finally:
        proc.kill()
        for pid in _children(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
