"""Multi-node and torchrun-style launches on loopback, and a dying rank ending the run cleanly."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from meshserve import LLM, SamplingParams
from meshserve.distributed.call_liveness import silence_limit_s
from meshserve.distributed.launch import free_port
from tests.conftest import VOCAB
from tests.process_tree import children as _children
from tests.process_tree import started_by


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


class _Lines:
    """A pipe's lines, read by a thread as they come, so a test can wait for one (an event, not a sleep)."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return True
            if not self._thread.is_alive():  # the pipe closed: the process is gone
                break
            time.sleep(0.02)
        return any(text in line for line in self.lines)

    def text(self, timeout: float = 10) -> str:
        """Everything, once the pipe has closed."""
        self._thread.join(timeout)
        return "".join(self.lines)


def _generate(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, _Lines]:
    """`meshserve generate` with INFO logs on stderr, read as they come."""
    proc = _cli("--log-level", "INFO", "generate", *args, env=env)
    return proc, _Lines(proc.stderr)


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


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_idle_workers_outwait_the_collective_timeout(tiny_model_dir, single_device_tokens, layout):
    """An idle TP or PP engine: its workers wait for the next call, and with PP rank 0's thread for the last
    stage's next result, past --distributed-timeout-s (both used to time out in that wait and take the engine
    down after the timeout of idleness)."""
    llm = LLM(model=tiny_model_dir("qwen3"), distributed_timeout_s=2, **layout)
    try:
        assert _tokens(llm) == single_device_tokens
        time.sleep(5)  # idle for 2.5 x the collective timeout: the condition under test, not a wait for an event
        assert _tokens(llm) == single_device_tokens
    finally:
        llm.shutdown()


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


def _wait_for_workers(proc: subprocess.Popen, count: int, timeout: float = 60) -> list[int]:
    """Pids of the worker ranks of proc, as soon as `count` of them exist."""
    workers: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(workers) < count and proc.poll() is None:
        workers = started_by(proc.pid)
        if len(workers) < count:
            time.sleep(0.02)
    assert len(workers) >= count, "the worker ranks never started"
    return workers


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _all_gone(pids: list[int], timeout: float = 15) -> bool:
    """Whether every pid has exited, waiting up to timeout for the last ones to be stopped."""
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


# start-up (imports, weights) on a loaded 2-core machine: 3.5-9 s per process has been seen; generous
READY_S = 180
READY = "engine core ready"
PROMPTS = [f"prompt {i}" for i in range(16)]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux_only
def test_killed_worker_stops_the_run_naming_the_rank(tiny_model_dir):
    path = tiny_model_dir("llama")
    # (faulthandler: a run that does not stop is sent SIGABRT below, so its threads' stacks say where it waits)
    proc, err = _generate("--model", path, "-tp", "2", "--no-chat", "--ignore-eos", "--max-tokens", "400",
                          "--distributed-timeout-s", "20", *PROMPTS, env={"PYTHONFAULTHANDLER": "1"})
    try:
        workers = _wait_for_workers(proc, 1)
        everything = _children(proc.pid) + started_by(proc.pid)  # helpers too: the forkserver
        assert err.wait_for(READY, READY_S), err.text()  # loaded; generation starts now
        os.kill(workers[0], signal.SIGKILL)
        start = time.monotonic()
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            pytest.fail(f"rank 0 did not stop within 60 s of rank 1's death; its stderr:\n{err.text()}")
        elapsed = time.monotonic() - start
        text = err.text()
        assert rc != 0
        assert f"rank 1 (pid {workers[0]}) exited with code -9" in text, text
        assert "during start-up" not in text and "Traceback" not in text, text
        assert elapsed < 30  # seconds at most, not the 20 s collective timeout plus start-up
        assert _all_gone(everything), "processes left behind"
    finally:
        proc.kill()


@pytest.mark.slow
@linux_only
def test_sigterm_shuts_every_rank_down(tiny_model_dir):
    path = tiny_model_dir("llama")
    # two ranks, a pipeline in flight: TP = 2 x PP = 2 started two more processes to stop the same way
    proc, err = _generate("--model", path, "-pp", "2", "--no-chat", "--ignore-eos",
                          "--max-tokens", "400", *PROMPTS)
    try:
        _wait_for_workers(proc, 1)
        everything = _children(proc.pid) + started_by(proc.pid)  # helpers too: the forkserver
        assert err.wait_for(READY, READY_S), err.text()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert _all_gone(everything), "processes left behind"
    finally:
        proc.kill()


@pytest.mark.slow
@linux_only
def test_worker_killed_during_start_up_is_named_at_once(tiny_model_dir):
    """Issue 19: the run used to wait out the 60 s rendezvous, then print a torch traceback naming no rank."""
    path = tiny_model_dir("llama")
    proc, err = _generate("--model", path, "-tp", "2", "--no-chat", "--ignore-eos", "--max-tokens", "200", "Hi")
    try:
        workers = _wait_for_workers(proc, 1)  # the rank exists: it is importing, far from ready
        everything = _children(proc.pid) + started_by(proc.pid)  # helpers too: the forkserver
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        rc = proc.wait(timeout=120)
        elapsed = time.monotonic() - start
        text = err.text()
        assert rc != 0
        assert re.search(rf"rank 1 \(pid {victim}\) exited with code -9 during start-up", text), text
        assert READY not in text and "Traceback" not in text, text
        assert proc.stdout.read() == ""
        assert elapsed < 30, f"{elapsed:.0f} s"  # before: the whole 60 s rendezvous timeout
        assert _all_gone(everything), "processes left behind"
    finally:
        proc.kill()


_DIE_IN_RENDEZVOUS = """
import os
cmd = open("/proc/self/cmdline").read()
# a spawned rank, or the forkserver the ranks are forked from (it imports torch.distributed): die in the rendezvous
if "spawn_main" in cmd or "multiprocessing.forkserver" in cmd:
    import socket
    import time

    import torch.distributed as dist

    def _die(*args, init_method, **kwargs):
        host, port = init_method[len("tcp://"):].rsplit(":", 1)
        while True:  # until rank 0 is in the rendezvous: its store listens
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                time.sleep(0.01)
        os._exit(7)

    dist.init_process_group = _die
"""


@pytest.mark.slow
@linux_only
def test_worker_dying_inside_the_rendezvous_is_named_at_once(tiny_model_dir, tmp_path):
    """The narrowest window: the rank reported in, and dies once rank 0 is blocked inside the rendezvous
    (in C++, until the timeout)."""
    (tmp_path / "sitecustomize.py").write_text(_DIE_IN_RENDEZVOUS)
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    path = tiny_model_dir("llama")
    start = time.monotonic()
    proc, err = _generate("--model", path, "-tp", "2", "--no-chat", "--max-tokens", "4", "Hi",
                          env={"PYTHONPATH": pythonpath})
    try:
        rc = proc.wait(timeout=READY_S)
        text = err.text()
        assert rc != 0
        assert re.search(r"rank 1 \(pid \d+\) exited with code 7 during start-up", text), text
        assert "Traceback" not in text, text
        # start-up, less the 60 s rendezvous timeout it used to wait out
        assert time.monotonic() - start < 50
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


@pytest.mark.slow
@linux_only
def test_hung_worker_is_named_within_the_timeout(tiny_model_dir):
    path = tiny_model_dir("llama")
    timeout_s = 5
    proc, err = _generate("--model", path, "-tp", "2", "--no-chat", "--ignore-eos", "--max-tokens", "400",
                          "--distributed-timeout-s", str(timeout_s), *PROMPTS)
    try:
        workers = _wait_for_workers(proc, 1)
        everything = _children(proc.pid) + started_by(proc.pid)  # helpers too: the forkserver
        assert err.wait_for(READY, READY_S), err.text()
        os.kill(workers[0], signal.SIGSTOP)  # alive but silent
        start = time.monotonic()
        rc = proc.wait(timeout=60)
        text = err.text()
        assert rc != 0 and "rank 1 stopped responding" in text, text
        assert time.monotonic() - start < timeout_s + 15  # the collective timeout, then a prompt stop
        assert _all_gone(everything), "processes left behind"
    finally:
        proc.kill()
        for pid in started_by(proc.pid) + _children(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


_IDLE_ENGINE = """
import sys, time
from meshserve import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], tensor_parallel_size=2, distributed_timeout_s=2)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2), use_tqdm=False)
    print("ready", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
@linux_only
def test_worker_leaves_when_rank_0_falls_silent(tiny_model_dir, tmp_path):
    """Rank 0 stopped (as if its node vanished, sockets left open): no keepalives, so the idle worker leaves
    within the silence limit instead of waiting out its gloo group's idle timeout (distributed/call_liveness.py)."""
    script = tmp_path / "idle_engine.py"
    script.write_text(_IDLE_ENGINE)
    env = {**os.environ, "MESHSERVE_WORKER_LOG": "ERROR"}
    proc = subprocess.Popen([sys.executable, str(script), tiny_model_dir("qwen3")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = _Lines(proc.stderr)
    try:
        assert proc.stdout.readline().strip() == "ready", err.text()
        (worker,) = _wait_for_workers(proc, 1)
        time.sleep(3)  # idle past the 2 s timeout with rank 0 alive: keepalives keep the worker
        assert _alive(worker)
        proc.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        assert _all_gone([worker], timeout=silence_limit_s(2) + 20), "the worker outwaited a silent rank 0"
        assert time.monotonic() - start > silence_limit_s(2) - 2  # it waited for the limit, not less
        assert err.wait_for("no call from rank 0", 5), err.text()
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        for pid in started_by(proc.pid) + _children(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
