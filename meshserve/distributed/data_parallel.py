"""Data parallel on one node: which GPUs each of N engine replicas (each TP x PP devices wide) gets.

Used by both DP back ends of `meshserve serve --data-parallel-size N`: the internal one (N engine-core
processes under one API front end, engine/dp_core_client.py) and the router one (N child servers behind
`meshserve router`, router/launcher.py). A replica sees only its slice through CUDA_VISIBLE_DEVICES, so its
ranks use devices 0..TP*PP-1 as they would alone.
"""

from __future__ import annotations

import os


def partition_devices(num_replicas: int, per_replica: int, visible: list[str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES per replica, or None each when there are not enough devices to split."""
    if len(visible) < num_replicas * per_replica:
        return [None] * num_replicas
    return [",".join(visible[i * per_replica : (i + 1) * per_replica]) for i in range(num_replicas)]


def visible_devices(device: str) -> list[str]:
    """The GPUs this process may hand out (CUDA_VISIBLE_DEVICES, else all CUDA devices); none on the CPU."""
    if device == "cpu":
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch/CUDA: replicas share whatever there is
        return []


def replica_devices(
    num_replicas: int, tensor_parallel_size: int, pipeline_parallel_size: int, device: str
) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each replica of a TP x PP layout (None: leave the variable as it is)."""
    return partition_devices(
        num_replicas, tensor_parallel_size * pipeline_parallel_size, visible_devices(device)
    )
