"""The engine with KV offload: greedy tokens equal to HF / to no offload when prefixes come back from the CPU
tier, from the disk tier (in one run and after a restart), with damaged files, and with swap preemption."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from meshserve import LLM, SamplingParams
from meshserve.errors import InvalidArgumentError
from tests.conftest import VOCAB

MAX_NEW = 6
# the tiny llama's block of 4 tokens: 2 layers x (K, V) x 4 tokens x 2 KV heads x 24 dims x 4 bytes
BLOCK_BYTES = 2 * 2 * 4 * 2 * 24 * 4


def gib(blocks: int) -> float:
    return blocks * BLOCK_BYTES / 2**30


def prompts(seed: int = 0, n: int = 4, length: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(length)] for _ in range(n)]


def hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=MAX_NEW)
    return out[0, len(prompt):].tolist()


def revisit(path: str, ps: list[list[int]], rounds: int = 2, **kwargs) -> tuple[list[list[int]], dict]:
    """Each prompt alone, in turn, twice: with 24 GPU blocks of 4 tokens, a prompt's 10 blocks are evicted by
    the next ones before it comes back."""
    llm = LLM(model=path, block_size=4, num_gpu_blocks_override=24, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids
            for _ in range(rounds) for p in ps]
    stats = llm.engine.stats()
    llm.shutdown()
    return outs, stats


@pytest.fixture(autouse=True)
def disk_restores_always(monkeypatch):
    """These tests count restores from disk: every disk run is read, whatever the read-rate estimate says (on a
    busy machine a slow measured read could make recomputing these tiny prefixes look cheaper:
    test_kv_restore_cost.py tests that decision)."""
    from meshserve.engine.kv_offload.manager import KVOffloadManager

    monkeypatch.setattr(KVOffloadManager, "_read_pays", lambda self, num_blocks, recompute_s: True)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def expected(model, hf_model):
    return [hf_greedy(hf_model(model), p) for p in prompts()] * 2


def test_prefixes_restored_from_the_cpu_tier(model, expected):
    got, stats = revisit(model, prompts(), kv_offloading_size=gib(64), kv_offloading_verify=True)
    assert got == expected
    assert stats["kv_offload_cpu_hits"] >= 4 * 9  # each revisit restores its 9 full blocks (one token computed)
    assert stats["kv_offload_disk_hits"] == 0
    assert stats["kv_offload_cpu_bytes_loaded"] >= 36 * BLOCK_BYTES and stats["kv_offload_restores"] >= 4
    assert stats["prefix_cache_hits"] >= 4 * 36


def test_prefixes_restored_from_disk_then_after_a_restart(model, expected, tmp_path):
    # a CPU tier of 12 blocks: a prompt's blocks fit, the 4 prompts' 44 do not (the GPU keeps 24)
    disk = {"kv_offloading_size": gib(12), "kv_offloading_disk_path": str(tmp_path),
                "kv_offloading_disk_size": gib(200), "kv_offloading_verify": True}
    got, stats = revisit(model, prompts(), **disk)
    assert got == expected
    assert stats["kv_offload_disk_hits"] >= 16 and stats["kv_offload_disk_bytes_read"] > 0
    # a warm restart: the index comes back from the files (the engine flushed every cached block at
    # shutdown), so the first visits already hit, each for all of its 9 blocks
    got, stats = revisit(model, prompts(), rounds=1, **disk)
    assert got == expected[:4]
    assert stats["kv_offload_disk_hits"] == 4 * 9
    assert stats["kv_offload_disk_errors"] == 0


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupted"])
def test_damaged_disk_files_are_recomputed(damage, model, expected, tmp_path):
    disk = {"kv_offloading_size": gib(12), "kv_offloading_disk_path": str(tmp_path), "kv_offloading_disk_size": gib(200)}
    revisit(model, prompts(), rounds=1, **disk)
    (folder,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    files = sorted(os.listdir(folder))
    assert len(files) == 44  # every block the 4 prompts filled, flushed at shutdown
    for name in files:
        path = os.path.join(folder, name)
        data = Path(path).read_bytes()
        if damage == "missing":
            os.remove(path)
        elif damage == "truncated":
            Path(path).write_bytes(data[: len(data) // 2])
        else:  # same size, a few payload bytes flipped: only the checksum can tell
            Path(path).write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
    got, stats = revisit(model, prompts(), rounds=1, **disk)
    assert got == expected[:4]
    assert stats["kv_offload_disk_hits"] == 0
    # truncated files are dropped when the index is rebuilt (all 44), corrupted ones when a lookup's read of
    # them is filed: each prompt's run of 9 is read in parts on the reader threads, and the prompt recomputes
    # as soon as the part holding its first block is filed, so the last prompt's other parts may still be in
    # flight when the run ends (nothing steps the offline engine after that): at least one per prompt, at most
    # the 4 runs of 9
    errors = stats["kv_offload_disk_errors"]
    if damage == "corrupted":
        assert 4 <= errors <= 36
    else:
        assert errors == {"missing": 0, "truncated": 44}[damage]


def test_disk_tier_is_bounded_and_another_model_reads_none(model, tiny_model_dir, tmp_path):
    disk = {"kv_offloading_size": gib(6), "kv_offloading_disk_path": str(tmp_path), "kv_offloading_disk_size": gib(12)}
    revisit(model, prompts(), rounds=1, **disk)
    (folder,) = os.listdir(tmp_path)
    on_disk = sum(os.path.getsize(os.path.join(tmp_path, folder, f)) for f in os.listdir(tmp_path / folder))
    assert 0 < on_disk <= gib(12) * 2**30
    other = tiny_model_dir("qwen2")  # another model, same folder: its own fingerprint, none of these files
    _, stats = revisit(other, prompts()[:1], rounds=1, **disk)
    assert stats["kv_offload_disk_hits"] == 0 and len(os.listdir(tmp_path)) == 2


@pytest.mark.parametrize("mode", ["swap", "auto"])
def test_swap_preemption_matches_hf(mode, model, hf_model):
    ps = prompts(2, n=6, length=12)
    expected = [hf_greedy(hf_model(model), p) for p in ps]
    # 12 blocks x 4 tokens: four prompts are admitted at once, then their decodes run out of blocks
    llm = LLM(model=model, block_size=4, num_gpu_blocks_override=12, kv_offloading_size=gib(64),
              preemption_mode=mode, kv_offloading_verify=True)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    stats = llm.engine.stats()
    llm.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert stats["num_preemptions"] > 0
    # auto: moving a few KB takes microseconds, recomputing milliseconds (the step-time model): it swaps too
    assert stats["kv_offload_swaps_out"] == stats["num_preemptions"] == stats["kv_offload_swaps_in"]


@pytest.mark.parametrize("kwargs, param", [
    ({"kv_offloading_disk_path": "/tmp/x", "kv_offloading_disk_size": 1.0}, "kv_offloading_disk_path"),
    ({"kv_offloading_size": 1.0, "kv_offloading_disk_path": "/tmp/x"}, "kv_offloading_disk_size"),
    ({"preemption_mode": "swap"}, "preemption_mode"),
    ({"preemption_mode": "later"}, "preemption_mode"),
    ({"kv_offloading_size": -1.0}, "kv_offloading_size"),
    ({"kv_offloading_size": 1.0, "tensor_parallel_size": 2}, "kv_offloading_size"),
    # these passed validation: inf failed after loading ("cannot convert float infinity to integer"), a size past
    # the host's memory as the allocator's "[enforce fail at alloc_cpu.cpp:127] ... can't allocate memory"
    ({"kv_offloading_size": float("inf")}, "kv_offloading_size"),
    ({"kv_offloading_size": 1.0, "kv_offloading_disk_path": "/tmp/x", "kv_offloading_disk_size": float("inf")},
     "kv_offloading_disk_size"),
    ({"kv_offloading_size": 1 << 40}, "kv_offloading_size"),  # a TiB GiB
    # vLLM's --kv-offloading-backend: native is meshserve's own tiers; lmcache is refused, saying what to use
    ({"kv_offloading_size": 1.0, "kv_offloading_backend": "lmcache"}, "kv_offloading_backend"),
    ({"kv_offloading_backend": "redis"}, "kv_offloading_backend"),
])
def test_bad_offload_arguments_are_clear_errors(kwargs, param):
    from meshserve.config import EngineArgs

    with pytest.raises(InvalidArgumentError) as e:
        EngineArgs(**kwargs).validate()
    assert e.value.param == param and "\n" not in str(e.value)
    if "kv_offloading_backend" in kwargs:
        assert "--kv-offloading-size" in str(e.value) or "must be native" in str(e.value)
    if kwargs.get("kv_offloading_size") == 1 << 40:
        assert "more than this host's memory" in str(e.value)


def test_a_cpu_tier_larger_than_the_free_memory_is_refused_before_it_is_allocated(model, monkeypatch):
    # checked once the weights are in: an unpinned tier is not zeroed, so past the free memory it would fail
    # only as it fills (the OOM killer, mid-request)
    import meshserve.engine.kv_offload.setup as setup

    allocated = []
    monkeypatch.setattr(setup, "available_memory_bytes", lambda: BLOCK_BYTES * 10)
    monkeypatch.setattr(setup, "CPUTier", lambda *a, **k: allocated.append(a))
    with pytest.raises(InvalidArgumentError, match=r"--kv-offloading-size .* GiB: only 0.0 GiB of host memory is "
                                                   r"free \(after loading the model\); lower it"):
        LLM(model=model, block_size=4, num_gpu_blocks_override=24, kv_offloading_size=gib(64))
    assert not allocated


def test_cli_flags_reach_engine_args():
    import argparse

    from meshserve.cli_args import add_engine_args, engine_args_from

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    ns = parser.parse_args(["--kv-offloading-size", "4", "--kv-offloading-disk-path", "/tmp/kv",
                            "--kv-offloading-disk-size", "100", "--preemption-mode", "auto",
                            "--kv-offloading-backend", "native"])  # vLLM's flag (was "unrecognized arguments")
    args = engine_args_from(ns)
    assert (args.kv_offloading_size, args.kv_offloading_disk_path, args.kv_offloading_disk_size,
            args.preemption_mode, args.kv_offloading_backend) == (4.0, "/tmp/kv", 100.0, "auto", "native")
    args.validate()


def test_offload_counters_reach_prometheus():
    from prometheus_client.parser import text_string_to_metric_families

    from meshserve.serve.metrics import ServerMetrics

    stats = {"kv_offload_cpu_hits": 7, "kv_offload_disk_hits": 3, "kv_offload_disk_bytes_read": 4096,
             "kv_offload_swaps_out": 2, "kv_offload_restore_s": 0.25, "kv_offload_cpu_blocks": 11,
             "kv_offload_disk_restores_skipped": 5, "kv_offload_disk_read_bytes_per_s": 2e9,
             "kv_offload_disk_read_s": 1.5}
    text = ServerMetrics().render((stats, 0.0)).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("meshserve:kv_offload_hits_total", (("tier", "cpu"),))] == 7
    assert samples[("meshserve:kv_offload_hits_total", (("tier", "disk"),))] == 3
    assert samples[("meshserve:kv_offload_bytes_total", (("direction", "out"), ("tier", "disk")))] == 4096
    assert samples[("meshserve:kv_offload_swaps_total", (("direction", "out"),))] == 2
    assert samples[("meshserve:kv_offload_restore_seconds_total", ())] == 0.25
    assert samples[("meshserve:kv_offload_blocks", (("tier", "cpu"),))] == 11
    assert samples[("meshserve:kv_offload_disk_restores_skipped_total", ())] == 5
    assert samples[("meshserve:kv_offload_disk_read_bytes_per_second", ())] == 2e9
    assert samples[("meshserve:kv_offload_disk_read_seconds_total", ())] == 1.5
