"""The parallel Triton pre-compile on a cold cache (issue 29; engine/parallel_warmup.py; the last test: its
compiles in worker processes, MESHSERVE_PARALLEL_COMPILE=procs): a fresh process with
an empty TRITON_CACHE_DIR starts with MESHSERVE_PARALLEL_COMPILE=1, its passes compile the start-up's kernels,
then a W2-like mix builds nothing; greedy tokens equal those of the plain start-up (switch 0, its own empty
cache). Each start-up runs in its own process: kernels a JITFunction holds in memory would otherwise hide the
cold path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start(checkpoint: str, switch: str, cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MESHSERVE_ATTENTION_BACKEND", "MESHSERVE_DISABLE_FUSED_OPS", "TRITON_INTERPRET")}
    env.update(MESHSERVE_PARALLEL_COMPILE=switch, TRITON_CACHE_DIR=cache_dir,
               PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu", "parallel_compile_run.py"),
                           checkpoint], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (
        f"rc {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("family", ["llama", "deepseek_v2"])
def test_cold_start_compiles_in_parallel_and_nothing_after(family, tmp_path_factory):
    from tests.conftest import make_tiny_checkpoint

    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp(f"pc-{family}")), family,
                                max_position_embeddings=32768)
    cache = str(tmp_path_factory.mktemp("triton-cache-on"))
    on = _start(path, "1", cache)
    assert [p[0] for p in on["passes"]] == ["profile step", "warm-up and capture steps"], on["passes"]
    assert all(submitted > 0 and compiled > 0 for _, submitted, compiled, _ in on["passes"]), on["passes"]
    assert on["builds"] == 0, f"{on['builds']} Triton builds after start-up:\n{on['report']}"
    off = _start(path, "0", str(tmp_path_factory.mktemp("triton-cache-off")))
    assert off["passes"] == []
    assert on["tokens"] == off["tokens"] and on["alone"] == off["alone"]
    # warm: the profile step's kernels all load from the disk cache, so the warm-up pass is skipped (its cost
    # is a second run of every warm-up forward), and serving still builds nothing new
    warm = _start(path, "1", cache)
    assert [(p[0], p[2]) for p in warm["passes"]] == [("profile step", 0)], warm["passes"]
    assert warm["builds"] == 0, f"{warm['builds']} Triton builds after a warm start-up:\n{warm['report']}"
    assert warm["tokens"] == on["tokens"]


def test_cold_start_with_compile_processes_builds_nothing_after(tmp_path_factory):
    """MESHSERVE_PARALLEL_COMPILE=procs (kernels/process_compile_pool.py): every compile of both passes goes
    to a worker process (none falls back: each child's cache key equals the engine's), the engine's own
    launches then load them, serving builds nothing, and the tokens equal the thread pool's."""
    from tests.conftest import make_tiny_checkpoint

    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("pc-procs")), "llama", max_position_embeddings=32768)
    procs = _start(path, "procs", str(tmp_path_factory.mktemp("triton-cache-procs")))
    assert [p[0] for p in procs["passes"]] == ["profile step", "warm-up and capture steps"], procs["passes"]
    assert all(submitted > 0 and compiled > 0 for _, submitted, compiled, _ in procs["passes"]), procs["passes"]
    assert all(processes and fallbacks == 0 for _, processes, fallbacks in procs["in_processes"]), \
        procs["in_processes"]
    assert procs["builds"] == 0, f"{procs['builds']} Triton builds after start-up:\n{procs['report']}"
    threads = _start(path, "1", str(tmp_path_factory.mktemp("triton-cache-threads")))
    assert procs["tokens"] == threads["tokens"] and procs["alone"] == threads["alone"]
