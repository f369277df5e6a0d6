"""DP = 2 on two GPUs (the internal back end of `serve --data-parallel-size 2`): each engine core on its own GPU,
both serving, fp32 greedy tokens equal to one GPU's (tests/gpu/layout_run.py at TP = PP = 1)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]

RUNNER = os.path.join(os.path.dirname(__file__), "layout_run.py")
MODEL = "qwen3-0.6b"


def _one_gpu_tokens() -> list[list[int]]:
    env = dict(
        os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, RUNNER, MODEL, "float32", "1", "1", "auto"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])["tokens"]


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode() for k, v in pairs}


def test_dp2_cores_on_their_own_gpus_give_one_gpus_tokens():
    from meshserve import SamplingParams
    from meshserve.config import EngineArgs
    from meshserve.engine.async_engine import AsyncLLM
    from meshserve.engine.dp_core_client import DPCoreClient, spawn_dp_cores
    from tests.gpu.layout_run import prompts

    expected = _one_gpu_tokens()
    args = EngineArgs(
        model=MODEL,
        load_format="dummy",
        dtype="float32",
        max_model_len=1024,
        hf_overrides={"num_hidden_layers": 4},
        gpu_memory_utilization=0.5,
        max_num_seqs=32,
        seed=0,
    )
    client = DPCoreClient.from_core_processes(args, spawn_dp_cores(args, 2))
    allm = AsyncLLM(client)
    try:
        assert sorted(_environ(c.proc.pid)["CUDA_VISIBLE_DEVICES"] for c in client.clients) == ["0", "1"]
        greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

        async def one(i: int, prompt: dict) -> list[int]:
            last = None
            async for out in allm.generate(prompt, greedy, request_id=f"p{i}"):
                last = out
            return list(last.outputs[0].token_ids)

        async def run() -> list[list[int]]:
            return await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts(6))])

        got = asyncio.run(run())
        assert client.num_requests == [3, 3]
        assert got == expected
    finally:
        allm.shutdown()
    assert not any(c.proc.is_alive() for c in client.clients)
