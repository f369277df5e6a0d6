"""Compile Triton kernels to sm_90 code on a machine without a GPU (Triton's bundled ptxas), in a subprocess so
the interpreter mode of the test process does not apply. It catches codegen errors the interpreter lets through
(loop-carried types, scalar conditions, constants specialised to 1)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def assert_compiles_for_sm90(script: str, timeout_s: int = 300) -> None:
    """Run `script` (which compiles kernels with triton.compile for GPUTarget("cuda", 90, 32) and prints
    "compiled") outside the interpreter; skip when this Triton ships no ptxas."""
    res = subprocess.run([sys.executable, "-c", script], check=False, env={**os.environ, "TRITON_INTERPRET": "0"},
                         capture_output=True, text=True, timeout=timeout_s)
    if "No such file" in res.stderr and "ptxas" in res.stderr:
        pytest.skip("no ptxas bundled with this triton")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
