"""The GPU catalog: every GPU the issue names, user overrides, and driver-name matching."""

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.planner.hardware import get_gpu, load_catalog, match_device_name

REQUIRED = ["A100-40GB-PCIe", "A100-40GB-SXM", "A100-80GB-PCIe", "A100-80GB-SXM", "H100-PCIe", "H100-SXM",
            "H200", "B200", "L4", "L40S", "A10G", "MI300X", "RTX-4090"]


def test_catalog_has_every_gpu_with_assumed_prices():
    cat = load_catalog()
    for name in REQUIRED:
        g = cat[name]
        assert g.memory_gib > 0 and g.hbm_gb_s > 0 and g.bf16_tflops > 0 and g.link_gb_s > 0
        assert g.gpus_per_node >= 1 and g.price_per_hour_usd > 0 and g.price_is_assumption
    assert cat["H100-SXM"].hbm_gb_s == 3350 and cat["A100-80GB-SXM"].fp8_tflops is None


def test_names_are_forgiving():
    assert get_gpu("h100_sxm").name == "H100-SXM"
    assert get_gpu("NVIDIA H100 80GB HBM3").name == "H100-SXM"


@pytest.mark.parametrize("device, name", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB-SXM"), ("NVIDIA A100-SXM4-40GB", "A100-40GB-SXM"),
    ("NVIDIA A100 80GB PCIe", "A100-80GB-PCIe"), ("NVIDIA A100-PCIE-40GB", "A100-40GB-PCIe"),
    ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("NVIDIA A10G", "A10G"), ("NVIDIA B200", "B200"),
    ("AMD Instinct MI300X", "MI300X"), ("NVIDIA GeForce RTX 4090", "RTX-4090"),
])
def test_driver_names_match(device, name):
    assert match_device_name(device, load_catalog()).name == name


def test_hardware_file_overrides_and_adds(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('[gpus.H100-SXM]\nprice_per_hour_usd = 1.5\nefficiency = 0.7\n\n'
                 '[gpus.MyGPU]\nmemory_gib = 32\nhbm_gb_s = 1000\nbf16_tflops = 100\nlink = "PCIe"\n'
                 'link_gb_s = 32\nlink_latency_us = 20\ngpus_per_node = 4\nprice_per_hour_usd = 0.5\n')
    cat = load_catalog(f)
    assert cat["H100-SXM"].price_per_hour_usd == 1.5 and cat["H100-SXM"].hbm_gb_s == 3350
    assert cat["MyGPU"].gpus_per_node == 4 and cat["MyGPU"].efficiency == 0.8


def test_bad_hardware_file_is_an_error(tmp_path):
    with pytest.raises(InvalidArgumentError, match="not found"):
        load_catalog(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gpus.X]\nmemory_gib = 1\nbogus = 2\n")
    with pytest.raises(InvalidArgumentError, match="unknown keys"):
        load_catalog(bad)
    with pytest.raises(InvalidArgumentError, match="unknown GPU"):
        get_gpu("Voodoo5")
