"""The offload tiers' limits: a disk tier that cannot fit its file system, or cannot be written, is refused at start
with one line naming the flag; a disk that fills up mid-run loses no request (the block is just not kept, one
warning); files of another model, quantization or rewritten weights are never read."""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from collections import namedtuple
from types import SimpleNamespace

import pytest

import meshserve.engine.kv_offload.disk_space as disk_space
import meshserve.engine.kv_offload.disk_tier as disk_tier
from meshserve import LLM, SamplingParams
from meshserve.config import EngineArgs
from meshserve.engine.args_check import check_engine_args
from meshserve.engine.kv_offload.disk_tier import HEADER, DiskTier
from meshserve.errors import InvalidArgumentError
from tests.conftest import VOCAB

GiB = 1 << 30
BLOCK = 64
FILE = HEADER.size + BLOCK
FP = bytes(range(16))
Usage = namedtuple("Usage", "total used free")
# the tiny llama's block of 4 tokens: 2 layers x (K, V) x 4 tokens x 2 KV heads x 24 dims x 4 bytes
BLOCK_BYTES = 2 * 2 * 4 * 2 * 24 * 4


def gib(blocks: float) -> float:
    return blocks * BLOCK_BYTES / GiB


def free_space(monkeypatch, free: int, total: int = 100 * GiB) -> None:
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: Usage(total, total - free, free))


def one_line(e: pytest.ExceptionInfo, param: str) -> str:
    assert e.value.param == param and "\n" not in str(e.value)
    return str(e.value)


# -- 1. the disk tier's size against its file system ---------------------------------------------------------
def test_a_disk_tier_larger_than_the_free_space_is_refused_before_loading(monkeypatch, tmp_path):
    free_space(monkeypatch, 10 * GiB)
    args = EngineArgs(model="nowhere", kv_offloading_size=1.0, kv_offloading_disk_path=str(tmp_path / "kv"),
                      kv_offloading_disk_size=500.0)
    with pytest.raises(InvalidArgumentError) as e:
        check_engine_args(args)  # what LLM(...), `meshserve serve` and `serve --config FILE` run first
    msg = one_line(e, "kv_offloading_disk_size")
    assert "--kv-offloading-disk-size 500 GiB" in msg and "10.00 GiB free" in msg and str(tmp_path / "kv") in msg
    assert "1.00 GiB is kept free" in msg and "at most 9.00 GiB" in msg
    assert not (tmp_path / "kv").exists()  # refused before anything is made


def test_the_margin_is_one_gib_or_five_percent_of_a_small_file_system(monkeypatch, tmp_path):
    free_space(monkeypatch, 10 * GiB)
    disk_space.check_disk_tier_args(str(tmp_path), 9.0)  # 9 + 1 GiB margin fit 10 GiB free
    with pytest.raises(InvalidArgumentError):
        disk_space.check_disk_tier_args(str(tmp_path), 9.5)
    free_space(monkeypatch, 2 * GiB, total=4 * GiB)  # margin 5 % of 4 GiB
    disk_space.check_disk_tier_args(str(tmp_path), 1.75)
    with pytest.raises(InvalidArgumentError):
        disk_space.check_disk_tier_args(str(tmp_path), 1.85)


def test_the_tier_own_files_count_as_room_and_other_models_files_are_named(monkeypatch, tmp_path):
    disk = DiskTier(str(tmp_path), FP, 10 * FILE, BLOCK)
    for i in range(4):
        disk.put(i.to_bytes(16, "little"), bytes(BLOCK))
    disk.close()
    margin = disk_space.margin_bytes(100 * GiB)
    free_space(monkeypatch, margin + 6 * FILE)  # 4 files there + 6 more fit the bound of 10
    DiskTier(str(tmp_path), FP, 10 * FILE, BLOCK).close()
    with pytest.raises(InvalidArgumentError) as e:  # another model's tier: those 4 files are not its room
        DiskTier(str(tmp_path), bytes(16), 10 * FILE, BLOCK)
    assert "other models' block folders under" in one_line(e, "kv_offloading_disk_size")


def test_a_missing_folder_is_made_and_a_file_or_an_unwritable_folder_is_refused(monkeypatch, tmp_path):
    disk = DiskTier(str(tmp_path / "a" / "b"), FP, 10 * FILE, BLOCK)
    assert os.path.isdir(disk.dir) and os.listdir(disk.dir) == []  # made; the write probe left nothing
    disk.close()
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(InvalidArgumentError) as e:
        disk_space.check_disk_tier_args(str(tmp_path / "f"), 1.0)
    assert "is a file, not a folder" in one_line(e, "kv_offloading_disk_path")

    def refused(path):  # a read-only file system (root passes os.access there)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(disk_tier, "_write_probe", refused)
    with pytest.raises(InvalidArgumentError, match="--kv-offloading-disk-path .*: cannot write in .*Read-only"):
        DiskTier(str(tmp_path / "ro"), FP, 10 * FILE, BLOCK)


@pytest.mark.parametrize("kwargs, param", [
    ({"kv_offloading_disk_size": 0.0}, "kv_offloading_disk_size"),
    ({"kv_offloading_disk_size": -1.0}, "kv_offloading_disk_size"),
    ({"kv_offloading_disk_size": float("nan")}, "kv_offloading_disk_size"),
    ({"kv_offloading_size": None, "kv_offloading_disk_size": 1.0}, "kv_offloading_disk_path"),  # no CPU tier
])
def test_bad_disk_sizes_and_a_disk_tier_alone_are_refused(kwargs, param, tmp_path):
    args = {"kv_offloading_size": 1.0, "kv_offloading_disk_path": str(tmp_path), **kwargs}
    with pytest.raises(InvalidArgumentError) as e:
        EngineArgs(**args).validate()
    one_line(e, param)


# -- helpers for the engine tests ----------------------------------------------------------------------------
def prompts(n: int = 4, length: int = 40) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, VOCAB) for _ in range(length)] for _ in range(n)]


def revisit(path: str, rounds: int = 2, **kwargs) -> tuple[list[list[int]], dict]:
    """Each prompt alone, twice: 24 GPU blocks of 4 tokens cannot keep a prompt's 10 blocks until it comes back."""
    llm = LLM(model=path, block_size=4, num_gpu_blocks_override=24, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids
            for _ in range(rounds) for p in prompts()]
    stats = llm.engine.stats()
    llm.shutdown()
    return outs, stats


@pytest.fixture(autouse=True)
def disk_restores_always(monkeypatch):
    from meshserve.engine.kv_offload.manager import KVOffloadManager

    monkeypatch.setattr(KVOffloadManager, "_read_pays", lambda self, num_blocks, recompute_s: True)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


def test_a_disk_tier_smaller_than_one_block_is_refused(model, tmp_path):
    with pytest.raises(InvalidArgumentError) as e:
        LLM(model=model, block_size=4, num_gpu_blocks_override=24, kv_offloading_size=gib(8),
            kv_offloading_disk_path=str(tmp_path), kv_offloading_disk_size=gib(0.5))
    assert "holds no KV block file" in one_line(e, "kv_offloading_disk_size")


# -- 3. a disk that fills up during the run ------------------------------------------------------------------
def disk_full(path, header, payload):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_keeps_no_block_warns_once_and_shrinks_the_bound(monkeypatch, tmp_path, caplog):
    disk = DiskTier(str(tmp_path), FP, 10 * FILE, BLOCK)
    disk.put(bytes(16), bytes(BLOCK))
    disk.flush()
    monkeypatch.setattr(disk_tier, "_write_file", disk_full)
    lost = []
    disk.on_evict = lost.append
    hashes = [i.to_bytes(16, "little") for i in range(1, 4)]
    with caplog.at_level(logging.WARNING, logger=disk_tier.__name__):
        for block_hash in hashes:
            assert disk.put(block_hash, bytes(BLOCK)) is not None
        disk.flush()
        disk.reap()
    assert set(disk.index) == {bytes(16)} and disk.used_bytes == FILE  # the first block, written before
    assert sorted(lost) == sorted(hashes) and disk.num_errors == 3
    assert disk.max_bytes == FILE  # an LRU of what fits now, not a write failing each time
    assert all(disk.get(h) is None for h in hashes) and disk.num_errors == 3  # misses, not "damaged" files
    assert [r.message.count("cannot write") for r in caplog.records].count(1) == 1
    assert not [n for n in os.listdir(disk.dir) if n.endswith(".tmp")]
    disk.close()


def test_a_full_disk_mid_run_loses_no_request(model, monkeypatch, tmp_path, caplog):
    plain, _ = revisit(model)
    monkeypatch.setattr(disk_tier, "_write_file", disk_full)
    with caplog.at_level(logging.WARNING, logger=disk_tier.__name__):
        outs, stats = revisit(model, kv_offloading_size=gib(6), kv_offloading_disk_path=str(tmp_path),
                              kv_offloading_disk_size=gib(64))
    assert outs == plain
    assert stats["kv_offload_disk_errors"] > 0 and stats["kv_offload_disk_blocks"] == 0
    assert sum("cannot write" in r.message for r in caplog.records) == 1


# -- 4. stale files: another configuration never reads them --------------------------------------------------
def fake_config(model: str, quantization=None):
    hf = SimpleNamespace(to_json_string=lambda use_diff: "{}")
    return SimpleNamespace(model_config=SimpleNamespace(model=model, hf_config=hf, load_format="auto", seed=0,
                                                        dtype="float32", quantization=quantization),
                           parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1))


def test_the_fingerprint_follows_quantization_weights_and_dummy_draws(model, tmp_path, monkeypatch):
    import torch

    from meshserve.engine.kv_offload.setup import kv_fingerprint

    folder = shutil.copytree(model, tmp_path / "m")
    shape = (2, 2, 4, 2, 24)

    def fp(quantization=None):
        return kv_fingerprint(fake_config(str(folder), quantization), shape, torch.float32)

    base = fp()
    assert fp() == base
    assert fp("fp8") != base  # the same checkpoint quantized on load: other KV
    monkeypatch.setenv("MESHSERVE_DUMMY_WEIGHTS", "vllm")
    assert fp() != base
    monkeypatch.delenv("MESHSERVE_DUMMY_WEIGHTS")
    (weights,) = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    st = os.stat(folder / weights)
    os.utime(folder / weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a fine-tune saved over it
    assert fp() != base


def test_weights_rewritten_in_place_read_no_block_of_the_old_ones(model, tmp_path):
    folder = str(shutil.copytree(model, tmp_path / "m"))
    disk = {"kv_offloading_size": gib(6), "kv_offloading_disk_path": str(tmp_path / "kv"),
            "kv_offloading_disk_size": gib(64)}
    revisit(folder, **disk)
    # one round each from here: a first visit of each prompt hits the disk only with an earlier run's blocks (how
    # many of a run's own blocks are written before its second round comes is the disk threads' timing)
    _, restart = revisit(folder, rounds=1, **disk)  # the same weights read the first run's blocks back
    assert restart["kv_offload_disk_hits"] > 0
    (weights,) = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    os.utime(os.path.join(folder, weights), ns=(10**18, 10**18))
    _, rewritten = revisit(folder, rounds=1, **disk)
    assert len(os.listdir(tmp_path / "kv")) == 2  # a folder of its own
    assert rewritten["kv_offload_disk_hits"] == 0  # a cold start: none of the old weights' blocks came back
    assert rewritten["kv_offload_disk_errors"] == 0
