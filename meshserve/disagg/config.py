"""KVTransferConfig: vLLM's --kv-transfer-config JSON, validated into a typed config at start-up."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from meshserve.errors import InvalidArgumentError
from meshserve.json_config import config_dict, config_error

CONNECTORS = ("torch", "nixl", "ipc")
ROLES = ("kv_producer", "kv_consumer", "kv_both")
# vLLM connector names refused with "not supported" rather than "unknown", with meshserve's nearest one
PLANNED_CONNECTORS = {"NixlConnector": "nixl", "P2pNcclConnector": "torch", "LMCacheConnectorV1": None,
                      "MooncakeConnector": None}
EXTRA_KEYS = {
    "backend": "torch connector: nccl or gloo (default: nccl on GPUs, gloo on CPUs); the nixl connector uses UCX",
    "transfer_timeout_s": "seconds a consumer waits for a transfer before freeing its blocks (default 30)",
    "hold_timeout_s": "seconds a producer holds blocks nobody pulls or acknowledges (default 120; nixl, ipc: after "
    "granting a read, transfer_timeout_s more)",
    "init_timeout_s": "seconds to wait for every kv rank to join (default 300)",
    "layerwise": "send each layer's new blocks as the producer's forward finishes it, so the transfer overlaps "
    "the prefill (true; nixl, ipc: the consumer reads each layer as it is announced), or a request's blocks once "
    "its prefill is done (false, the default)",
    "side_channel_host": "address peers reach this instance's side channel at (default: kv_ip when loopback, "
    "else this host's address)",
}


@dataclass
class KVTransferConfig:
    """Which connector moves the KV, this instance's role, and where the transfer group meets.

    kv_parallel_size instances form one transfer group (ranks 0..size-1, this one kv_rank), meeting at
    kv_ip:kv_port (rank 0 hosts the rendezvous store there). A producer runs prompts and holds their blocks
    until a consumer has pulled them; a consumer pulls the blocks of requests that carry a transfer handle
    and decodes; kv_both does either, per request.
    """

    kv_connector: str
    kv_role: str
    kv_rank: int = 0
    kv_parallel_size: int = 2
    kv_ip: str = "127.0.0.1"
    kv_port: int = 14579
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    def extra(self, key: str, default: Any) -> Any:
        return self.kv_connector_extra_config.get(key, default)

    @property
    def transfer_timeout_s(self) -> float:
        return float(self.extra("transfer_timeout_s", 30.0))

    @property
    def hold_timeout_s(self) -> float:
        return float(self.extra("hold_timeout_s", 120.0))

    @property
    def init_timeout_s(self) -> float:
        return float(self.extra("init_timeout_s", 300.0))

    @property
    def layerwise(self) -> bool:
        return bool(self.extra("layerwise", False))


def _bad(msg: str, key: str | None = None) -> InvalidArgumentError:
    return config_error("kv_transfer_config", msg, key)


def _check_int(d: dict, key: str, low: int, high: int) -> None:
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise _bad(f"must be an integer in [{low}, {high}], got {v!r}", key)


def parse_kv_transfer_config(value: Any) -> KVTransferConfig | None:
    """A KVTransferConfig from a dict, a JSON string or a KVTransferConfig (None stays None).

    Keys are vLLM's; every mistake is one InvalidArgumentError line naming the key."""
    if value is None or isinstance(value, KVTransferConfig):
        return value
    d = config_dict(value, KVTransferConfig, "kv_transfer_config")
    for key in ("kv_connector", "kv_role"):
        if d.get(key) is None:
            choices = CONNECTORS if key == "kv_connector" else ROLES
            raise _bad(f"is required (one of {', '.join(choices)})", key)
    if d["kv_connector"] in PLANNED_CONNECTORS:
        near = PLANNED_CONNECTORS[d["kv_connector"]]
        raise _bad(
            f"{d['kv_connector']!r} is vLLM's; meshserve's connectors are {', '.join(CONNECTORS)}"
            + (f' (use "{near}", with kv_rank and kv_parallel_size on every engine)' if near else ""),
            "kv_connector",
        )
    if d["kv_connector"] not in CONNECTORS:
        raise _bad(
            f"unknown connector {d['kv_connector']!r} (known: {', '.join(CONNECTORS)})", "kv_connector"
        )
    if d["kv_role"] not in ROLES:
        raise _bad(f"must be one of {', '.join(ROLES)}, got {d['kv_role']!r}", "kv_role")
    d.setdefault("kv_parallel_size", 2)
    d.setdefault("kv_rank", 0)
    _check_int(d, "kv_parallel_size", 2, 1024)
    _check_int(d, "kv_rank", 0, d["kv_parallel_size"] - 1)
    if "kv_port" in d:
        _check_int(d, "kv_port", 1, 65535)
    if "kv_ip" in d and (not isinstance(d["kv_ip"], str) or not d["kv_ip"]):
        raise _bad(f"must be a host name or IP address, got {d['kv_ip']!r}", "kv_ip")
    extra = d.get("kv_connector_extra_config") or {}
    if not isinstance(extra, dict):
        raise _bad(f"must be a JSON object, got {type(extra).__name__}", "kv_connector_extra_config")
    unknown = sorted(set(extra) - set(EXTRA_KEYS))
    if unknown:
        raise _bad(
            f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(EXTRA_KEYS))})",
            "kv_connector_extra_config",
        )
    if extra.get("backend", "nccl") not in ("nccl", "gloo"):
        raise _bad(f"must be nccl or gloo, got {extra['backend']!r}", "kv_connector_extra_config.backend")
    if not isinstance(extra.get("layerwise", False), bool):
        raise _bad(
            f"must be true or false, got {extra['layerwise']!r}", "kv_connector_extra_config.layerwise"
        )
    for key in ("transfer_timeout_s", "hold_timeout_s", "init_timeout_s"):
        v = extra.get(key, 1.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise _bad(f"must be a number of seconds > 0, got {v!r}", f"kv_connector_extra_config.{key}")
    d["kv_connector_extra_config"] = dict(extra)
    return KVTransferConfig(**d)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
