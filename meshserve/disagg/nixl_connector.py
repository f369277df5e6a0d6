"""The "nixl" connector: NIXL (the transfer library of Dynamo and vLLM), optional.

NIXL reads remote GPU memory directly (RDMA, NVLink, UCX) and needs no matched send/recv. It is not a
dependency of meshserve: where the library is absent, choosing it is a one-line start-up error that says so
and names the connector that works everywhere ("torch").
"""

from __future__ import annotations

import importlib.util

from meshserve.errors import KVTransferError


def nixl_available() -> bool:
    return importlib.util.find_spec("nixl") is not None


def make_nixl_connector(config, kv_tensors):
    if not nixl_available():
        raise KVTransferError(
            'kv_transfer_config: kv_connector "nixl" needs the NIXL library, which is not '
            'installed (pip install nixl, on a host with UCX/RDMA); the "torch" connector '
            "(NCCL or gloo) works without it"
        )
    raise KVTransferError(
        "kv_transfer_config: NIXL is installed, but meshserve's NIXL transport is not written "
        'yet; use kv_connector "torch" (NCCL between GPUs)'
    )
