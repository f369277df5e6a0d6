"""bench kv_link: one request's blocks pulled between two processes by each connector (tiny pools, CPU)."""

from __future__ import annotations

import argparse
import json

import pytest

from meshserve.bench import kv_link
from meshserve.disagg.nixl_connector import nixl_available


def _ns(**kw) -> argparse.Namespace:
    base = {"device": "cpu", "producer_device": "", "backend": ""}
    return argparse.Namespace(**{**base, **kw})


def test_the_torch_connector_uses_nccl_only_between_two_gpus():
    assert kv_link._torch_backend(_ns()) == "gloo"
    assert kv_link._torch_backend(_ns(device="cuda")) == "gloo"  # two processes on one GPU: NCCL refuses
    assert kv_link._torch_backend(_ns(device="cuda:0", producer_device="cuda:1")) == "nccl"
    assert kv_link._torch_backend(_ns(device="cuda:0", producer_device="cuda:1", backend="gloo")) == "gloo"


@pytest.mark.parametrize("connector", [
    "torch",
    "ipc",
    pytest.param("nixl", marks=pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")),
])
@pytest.mark.parametrize("ahead", [False, True], ids=["asked", "ids_ahead"])
def test_pulls_report_bytes_and_rates(connector, ahead, tmp_path):
    if ahead and connector == "torch":
        pytest.skip("ids ahead: the one-sided connectors' (ipc, nixl)")
    args = ["--ids-ahead"] * ahead + ["--output", str(tmp_path / "link.json"), "--connector", connector, "--blocks", "3", "--layers", "2", "--pool-blocks", "8", "--repeat", "2",
            "--kv-heads", "2", "--head-dim", "8", "--block-size", "4"]
    assert kv_link.main(args) == 0
    out = json.loads((tmp_path / "link.json").read_text())
    assert out["bytes"] == 3 * 2 * 2 * 4 * 2 * 8 * 2  # blocks x layers x K/V x tokens x heads x dims x bf16
    assert out["median_GBps"] > 0 and out["devices"] == ["cpu", "cpu"]
    if connector == "ipc":  # a one-sided read's split: the read alone, and its plan, inside the whole pull
        assert 0 < out["plan_median_s"] <= out["read_median_s"] <= out["median_s"]
    assert 0 < out["reply_median_s"] < out["median_s"]  # every connector waits for the producer's answer
