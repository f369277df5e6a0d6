"""Builds the KV offload tiers from the engine config and attaches them to the block manager and the runner."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from meshserve.config import EngineConfig
from meshserve.engine.kv_offload.cpu_tier import CPUTier
from meshserve.engine.kv_offload.disk_tier import HEADER, DiskTier
from meshserve.engine.kv_offload.host_memory import GiB, available_memory_bytes
from meshserve.engine.kv_offload.manager import KVOffloadManager
from meshserve.errors import InvalidArgumentError

logger = logging.getLogger(__name__)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weight_files_identity(model: str) -> list:
    """(name, size, mtime_ns) of the model's weight files (a folder's, or the one GGUF file): weights rewritten in
    place under the same path and config (a fine-tune saved over its folder) change it. [] for a preset name."""
    try:
        if os.path.isfile(model):
            paths = [model]
        elif os.path.isdir(model):
            paths = sorted(os.path.join(model, n) for n in os.listdir(model) if n.endswith(WEIGHT_SUFFIXES))
        else:
            return []
        out = []
        for path in paths:
            st = os.stat(path)
            out.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
        return out
    except OSError:
        return []


def kv_fingerprint(config: EngineConfig, block_shape: tuple[int, ...], dtype: torch.dtype) -> bytes:
    """16 bytes naming what a stored block's bytes mean: the model (its name, where it is, its config, its
    weight files' sizes and times, the weight source, quantization and seed, which random weights depend on),
    the dtype, the block layout and the meshserve version. Another model, the same model quantized otherwise,
    or weights rewritten in place never read the files (the disk tier keeps one folder per fingerprint)."""
    from meshserve import __version__

    mc = config.model_config
    pc = config.parallel_config
    hf = mc.hf_config.to_json_string(use_diff=False) if hasattr(mc.hf_config, "to_json_string") else str(mc.hf_config)
    desc = json.dumps({"model": mc.model, "hf_config": hf, "load_format": mc.load_format, "seed": mc.seed,
                       "dtype": mc.dtype, "kv_dtype": str(dtype), "block_shape": list(block_shape),
                       "tp": pc.tensor_parallel_size, "pp": pc.pipeline_parallel_size,
                       "path": os.path.realpath(mc.model) if os.path.exists(mc.model) else None,
                       "weights": weight_files_identity(mc.model), "quantization": getattr(mc, "quantization", None),
                       # dummy weights are drawn one of two ways (models/loader.py)
                       "dummy_weights": os.environ.get("MESHSERVE_DUMMY_WEIGHTS", ""),
                       "version": __version__}, sort_keys=True)
    return hashlib.blake2b(desc.encode(), digest_size=16).digest()


def build_kv_offload(config: EngineConfig, runner, block_manager) -> KVOffloadManager | None:
    """The tiers the cache config asks for (None: offloading is off), attached to block_manager and runner
    (in this process: the runner and the manager share the CPU tier's memory)."""
    cc = config.cache_config
    if not cc.kv_offloading_size:
        return None
    block_shape, dtype = runner.kv_block_layout()
    cpu_probe = torch.empty((), dtype=dtype)
    block_bytes = cpu_probe.element_size() * int(torch.Size(block_shape).numel())
    num_slots = int(cc.kv_offloading_size * GiB) // block_bytes
    if num_slots < 1:
        raise InvalidArgumentError(f"--kv-offloading-size {cc.kv_offloading_size} GiB holds no KV block of "
                                   f"{block_bytes} bytes; raise it", param="kv_offloading_size")
    if cc.kv_offloading_disk_path and int(cc.kv_offloading_disk_size * GiB) < HEADER.size + block_bytes:
        raise InvalidArgumentError(f"--kv-offloading-disk-size {cc.kv_offloading_disk_size} GiB holds no KV block "
                                   f"file of {HEADER.size + block_bytes} bytes; raise it",
                                   param="kv_offloading_disk_size")
    cuda = torch.device(config.device).type == "cuda"
    # checked now that the weights are in: the tier is not zeroed, so an unpinned one past what is free would
    # fail only as it fills (the OOM killer, mid-request)
    need, free = num_slots * block_bytes, available_memory_bytes()
    if free is not None and need > free:
        raise InvalidArgumentError(f"--kv-offloading-size {cc.kv_offloading_size} GiB: only {free / GiB:.1f} GiB "
                                   "of host memory is free (after loading the model); lower it",
                                   param="kv_offloading_size")
    try:
        cpu = CPUTier(num_slots, block_shape, dtype, pin_memory=cuda)
    except RuntimeError as e:  # (pinning is refused below what is free, e.g. under a locked-memory limit)
        raise InvalidArgumentError(f"--kv-offloading-size {cc.kv_offloading_size} GiB: cannot allocate "
                                   f"{need / GiB:.2f} GiB of {'pinned ' if cuda else ''}host memory "
                                   f"({str(e).splitlines()[0]}); lower it", param="kv_offloading_size") from None
    disk = None
    if cc.kv_offloading_disk_path:
        disk = DiskTier(cc.kv_offloading_disk_path, kv_fingerprint(config, block_shape, dtype),
                        int(cc.kv_offloading_disk_size * GiB), block_bytes)
    manager = KVOffloadManager(cpu, disk, config.scheduler_config.preemption_mode,
                               default_link_bytes_per_s=25e9 if cuda else 10e9)
    block_manager.attach_offload(manager)
    runner.attach_kv_offload(cpu, manager.stats, cc.kv_offloading_verify)
    logger.info("KV offload: CPU tier %d blocks (%.2f GiB%s)%s; preemption %s", num_slots,
                num_slots * block_bytes / GiB, ", pinned" if cuda else "",
                f", disk tier {cc.kv_offloading_disk_size} GiB in {disk.dir}" if disk else "",
                config.scheduler_config.preemption_mode)
    return manager
