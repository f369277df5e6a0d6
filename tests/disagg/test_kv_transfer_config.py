"""--kv-transfer-config: vLLM's keys into a typed config; every mistake is one line naming the key."""

from __future__ import annotations

import pytest

from meshserve.config import EngineArgs
from meshserve.disagg.config import parse_kv_transfer_config
from meshserve.disagg.coordinator import parse_transfer_params
from meshserve.errors import InvalidArgumentError, KVTransferError


def test_vllm_keys_parse_into_a_typed_config():
    c = parse_kv_transfer_config(
        '{"kv_connector": "torch", "kv_role": "kv_consumer", "kv_rank": 1, '
        '"kv_parallel_size": 2, "kv_ip": "10.0.0.2", "kv_port": 20000, '
        '"kv_connector_extra_config": {"backend": "gloo", "transfer_timeout_s": 7}}'
    )
    assert (c.kv_rank, c.kv_port, c.kv_ip, c.transfer_timeout_s) == (1, 20000, "10.0.0.2", 7.0)
    assert c.is_consumer and not c.is_producer
    assert parse_kv_transfer_config({"kv_connector": "torch", "kv_role": "kv_both"}).is_producer
    assert parse_kv_transfer_config(None) is None


@pytest.mark.parametrize(
    "value, words",
    [
        ("{bad json", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ({"kv_role": "kv_producer"}, "kv_connector: is required"),
        ({"kv_connector": "torch"}, "kv_role: is required"),
        ({"kv_connector": "mooncake", "kv_role": "kv_producer"}, "unknown connector 'mooncake'"),
        ({"kv_connector": "NixlConnector", "kv_role": "kv_producer"}, 'is vLLM\'s; meshserve\'s connectors are torch, '
         'nixl, ipc (use "nixl", with kv_rank and kv_parallel_size on every engine)'),
        ({"kv_connector": "P2pNcclConnector", "kv_role": "kv_producer"}, '(use "torch"'),
        ({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}, "connectors are torch, nixl, ipc"),
        ({"kv_connector": "torch", "kv_role": "producer"}, "kv_role: must be one of"),
        (
            {"kv_connector": "torch", "kv_role": "kv_both", "kv_rank": 2},
            "kv_rank: must be an integer in [0, 1]",
        ),
        ({"kv_connector": "torch", "kv_role": "kv_both", "kv_port": 0}, "kv_port"),
        (
            {"kv_connector": "torch", "kv_role": "kv_both", "kv_buffer_size": 1},
            "unknown key(s) kv_buffer_size",
        ),
        (
            {"kv_connector": "torch", "kv_role": "kv_both", "kv_connector_extra_config": {"backend": "mpi"}},
            "backend: must be nccl or gloo",
        ),
        (
            {
                "kv_connector": "torch",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"transfer_timeout_s": -1},
            },
            "transfer_timeout_s: must be a number of seconds > 0",
        ),
    ],
)
def test_mistakes_are_one_line_errors(value, words):
    with pytest.raises(InvalidArgumentError) as e:
        parse_kv_transfer_config(value)
    assert (
        words in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("kv_transfer_config")
    )


def test_engine_args_check_the_config_and_the_layout():
    with pytest.raises(InvalidArgumentError, match="kv_role"):
        EngineArgs(model="x", kv_transfer_config='{"kv_connector": "torch", "kv_role": "x"}').validate()
    with pytest.raises(InvalidArgumentError, match="one device per instance"):
        EngineArgs(
            model="x",
            tensor_parallel_size=2,
            kv_transfer_config={"kv_connector": "torch", "kv_role": "kv_both"},
        ).validate()


def test_request_params_are_checked():
    assert parse_transfer_params(None, "r") is None
    p = parse_transfer_params({"do_remote_decode": True}, "r")
    assert p.transfer_id == "r" and p.do_remote_decode
    p = parse_transfer_params({"do_remote_prefill": True, "transfer_id": "t", "remote_rank": 2,
                               "remote_block_ids": [7, 0]}, "r")
    assert (p.transfer_id, p.remote_rank, p.remote_block_ids) == ("t", 2, [7, 0])
    for bad, words in (
        ([1], "must be an object"),
        ({"do_remote_decode": True, "do_remote_prefill": True}, "exclude each other"),
        ({"remote_engine_id": "x"}, "unknown key(s) remote_engine_id"),
        ({"do_remote_prefill": True, "remote_rank": -1}, "remote_rank"),
        ({"do_remote_prefill": True, "remote_rank": 0, "remote_block_ids": [1, -2]}, "remote_block_ids must be"),
        ({"do_remote_prefill": True, "remote_rank": 0, "remote_block_ids": "1,2"}, "remote_block_ids must be"),
        ({"do_remote_prefill": True, "remote_block_ids": [1, 2]}, "needs remote_rank"),
    ):
        with pytest.raises(InvalidArgumentError, match="kv_transfer_params") as e:
            parse_transfer_params(bad, "r")
        assert words in str(e.value)


def test_nixl_reports_a_missing_library(monkeypatch):
    from meshserve.disagg import nixl_connector

    monkeypatch.setattr(nixl_connector, "nixl_available", lambda: False)  # (whether or not it is installed)
    with pytest.raises(KVTransferError, match="needs the NIXL library"):
        nixl_connector.make_nixl_connector(None, [])


def test_nixl_takes_layerwise():
    c = parse_kv_transfer_config(
        {"kv_connector": "nixl", "kv_role": "kv_producer", "kv_connector_extra_config": {"layerwise": True}}
    )
    assert c.kv_connector == "nixl" and c.layerwise


def test_ipc_is_a_connector_and_takes_layerwise():
    c = parse_kv_transfer_config(
        {"kv_connector": "ipc", "kv_role": "kv_consumer", "kv_connector_extra_config": {"layerwise": True}}
    )
    assert c.kv_connector == "ipc" and c.layerwise
