"""On the device: two engines on two GPUs (or one shared) move KV over NCCL and decode a single engine's tokens.

Run: python -m pytest -m gpu tests/disagg/test_disagg_gpu.py
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from meshserve.config import EngineArgs
from meshserve.engine.core import EngineCore
from meshserve.engine.messages import EngineCoreRequest
from meshserve.sampling import SamplingParams
from tests.disagg.engine_pair import free_port, producer_main, transfer_config
from tests.disagg.test_disagg_engine import _ids, _prefill, _run

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory) -> str:
    """A tiny Llama whose positions reach the prompts' 1,500 tokens (the shared fixture's stop at 512)."""
    from tests.conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("long-llama")), "llama", max_position_embeddings=2048)


@pytest.mark.parametrize("backend", ["nccl", "gloo", "nixl", "ipc"])
def test_gpu_pair_matches_single_engine(long_llama, backend):
    """backend nixl: the nixl connector (UCX between the GPUs' memory) instead of the torch one; ipc: the ipc
    connector (the consumer maps the producer's pool by CUDA IPC, one GPU or two)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL point-to-point needs two GPUs (one per process)")
    if backend == "nixl":
        from meshserve.disagg.nixl_connector import nixl_available

        if not nixl_available():
            pytest.skip("the NIXL library is not installed (pip install meshserve[nixl])")
    model = long_llama
    port = free_port()
    second = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    common = {
        "model": model,
        "block_size": 16,
        "max_model_len": 2048,
        "num_gpu_blocks_override": 400,
        "dtype": "float32",
    }
    ctx = mp.get_context("spawn")
    commands, results = ctx.Queue(), ctx.Queue()
    connector = backend if backend in ("nixl", "ipc") else "torch"
    prod_cfg = transfer_config("kv_producer", 0, port, connector=connector, transfer_timeout_s=30)
    if connector == "torch":  # (the nixl connector ignores the key)
        prod_cfg["kv_connector_extra_config"]["backend"] = backend
    proc = ctx.Process(
        target=producer_main,
        args=({**common, "device": "cuda:0", "kv_transfer_config": prod_cfg}, commands, results),
        daemon=True,
    )
    proc.start()
    cons_cfg = transfer_config("kv_consumer", 1, port, connector=connector, transfer_timeout_s=30)
    if connector == "torch":  # (the nixl connector ignores the key)
        cons_cfg["kv_connector_extra_config"]["backend"] = backend
    consumer = EngineCore.from_engine_args(EngineArgs(**common, device=second, kv_transfer_config=cons_cfg))
    try:
        assert results.get(timeout=300)[0] == "ready"
        prompts = [_ids(i, n) for i, n in enumerate((100, 700, 1500))]
        reqs = []
        for i, prompt in enumerate(prompts):
            p = SamplingParams(
                temperature=0,
                max_tokens=1,
                ignore_eos=True,
                kv_transfer_params={"do_remote_decode": True, "transfer_id": f"g{i}"},
            )
            reqs.append(EngineCoreRequest(f"p{i}", prompt, p, 1))
        _prefill(commands, results, reqs)
        dec = [
            EngineCoreRequest(
                f"d{i}",
                prompt,
                SamplingParams(
                    temperature=0,
                    max_tokens=16,
                    ignore_eos=True,
                    kv_transfer_params={"do_remote_prefill": True, "transfer_id": f"g{i}"},
                ),
                16,
            )
            for i, prompt in enumerate(prompts)
        ]
        got = _run(consumer, dec)
    finally:
        commands.put(("stop",))
        proc.join(60)
        consumer.shutdown()
    single = EngineCore.from_engine_args(EngineArgs(**common, device="cuda:0"))
    try:
        greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        want = _run(single, [EngineCoreRequest(f"d{i}", p, greedy, 16) for i, p in enumerate(prompts)])
    finally:
        single.shutdown()
    assert got == want


@pytest.mark.parametrize("backend", ["gloo", "nixl", "ipc"])
def test_gpu_layerwise_pair_matches_single_engine(long_llama, backend):
    """Layer-wise on GPUs: the consumers subscribe first, then the producer's chunked prefill announces (nixl:
    the consumer reads each layer's blocks from the producer's GPU once the layer's event is reached) or sends
    (gloo, staged through host memory) every layer as it finishes; tokens equal a single engine's."""
    from tests.disagg.test_layerwise_engine import _both_legs

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if backend == "nixl":
        from meshserve.disagg.nixl_connector import nixl_available

        if not nixl_available():
            pytest.skip("the NIXL library is not installed (pip install meshserve[nixl])")
    connector = backend if backend in ("nixl", "ipc") else "torch"
    second = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    common = {
        "model": long_llama,
        "block_size": 16,
        "max_model_len": 2048,
        "num_gpu_blocks_override": 400,
        "dtype": "float32",
    }
    port = free_port()
    extra = {"layerwise": True, "transfer_timeout_s": 60}
    ctx = mp.get_context("spawn")
    commands, results = ctx.Queue(), ctx.Queue()
    prod_cfg = transfer_config("kv_producer", 0, port, connector=connector, **extra)
    proc = ctx.Process(
        target=producer_main,
        args=(
            {**common, "device": "cuda:0", "max_num_batched_tokens": 256, "kv_transfer_config": prod_cfg},
            commands,
            results,
        ),
        daemon=True,
    )
    proc.start()
    cons_cfg = transfer_config("kv_consumer", 1, port, connector=connector, **extra)
    consumer = EngineCore.from_engine_args(EngineArgs(**common, device=second, kv_transfer_config=cons_cfg))
    prompts = [_ids(i, n) for i, n in enumerate((100, 700, 1500))]
    try:
        assert results.get(timeout=300)[0] == "ready"
        got, errors, _done = _both_legs(consumer, commands, results, prompts, "g", max_tokens=16)
        assert not errors, errors
        bm = consumer.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    finally:
        commands.put(("stop",))
        proc.join(60)
        consumer.shutdown()
    single = EngineCore.from_engine_args(EngineArgs(**common, device="cuda:0", max_num_batched_tokens=256))
    try:
        greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        want = _run(single, [EngineCoreRequest(f"dg{i}", p, greedy, 16) for i, p in enumerate(prompts)])
    finally:
        single.shutdown()
    assert got == want
