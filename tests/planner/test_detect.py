"""--gpu left out: the local GPU when the catalog knows it, else H100-SXM, and the report says which."""

import json
import os
import subprocess
import sys

from meshserve.cli import main
from meshserve.planner import detect
from meshserve.planner.hardware import load_catalog


def test_detected_gpu_is_used_and_named():
    choice = detect.choose_gpu(None, load_catalog(), device_name="NVIDIA H200")
    assert choice.gpu.name == "H200" and "detected on this machine (NVIDIA H200)" in choice.note


def test_unknown_or_absent_gpu_falls_back_to_h100_and_says_why():
    cat = load_catalog()
    unknown = detect.choose_gpu(None, cat, device_name="Voodoo5 6000")
    assert unknown.gpu.name == "H100-SXM" and "Voodoo5 6000 is not in the catalog" in unknown.note
    none = detect.choose_gpu(None, cat, device_name="")
    assert none.gpu.name == "H100-SXM" and "assumed: no GPU detected" in none.note
    assert detect.choose_gpu("L4", cat).note == ""  # --gpu given: nothing to explain


def test_cli_without_gpu_on_cpu_says_the_default_was_assumed(monkeypatch, capsys):
    monkeypatch.setattr(detect, "local_gpu_name", lambda: None)
    assert main(["plan", "llama-3.1-8b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("llama-3.1-8b on 1× H100-SXM")
    assert lines[1].startswith("GPU      H100-SXM assumed: no GPU detected on this machine; pass --gpu")
    assert main(["plan", "llama-3.1-8b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu_source"].startswith("H100-SXM assumed")
    assert main(["plan", "llama-3.1-8b", "--gpu", "H100-SXM"]) == 0
    assert "GPU      " not in capsys.readouterr().out


def test_real_detection_with_no_visible_gpu():
    # The real path, GPUs hidden: what a CPU-only machine prints.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "meshserve.cli", "plan", "qwen3-0.6b"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "H100-SXM assumed: no GPU detected on this machine" in out.splitlines()[1]
