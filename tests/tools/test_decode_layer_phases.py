"""tools/decode_layer_phases.py's bookkeeping on CPU: a program's clock record split into phases and barrier waits
(dense and MoE layers), and each GEMV phase's weight bytes in every format (the GPU run itself is the tool's)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

if importlib.util.find_spec("triton") is not None:
    _spec = importlib.util.spec_from_file_location(
        "decode_layer_phases", pathlib.Path(__file__).resolve().parents[2] / "tools" / "decode_layer_phases.py")
    tool = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(tool)

TINY = (64, 4, 2, 16, 128, True, None)  # hidden, heads, KV heads, head dim, intermediate, q/k norms, MoE


def test_a_record_splits_into_phases_and_barrier_waits():
    # start 0, after the wait 5, barriers k arrive / leave at 20 + 30k / 27 + 30k, end 200
    rec = [0, 5] + [v for k in range(5) for v in (20 + 30 * k, 27 + 30 * k)] + [200, 0, 0, 0]
    phases, barriers = tool._phases(rec, moe=False)
    assert phases == {"start": 5, "qkv": 15, "attention": 23, "o": 23, "gate_up": 53, "down": 200 - 147}
    assert barriers == {0: 7, 1: 7, 2: 7, 4: 7}  # a dense layer has no router barrier
    phases, barriers = tool._phases(rec, moe=True)
    assert phases["router"] == 23 and phases["gate_up"] == 23 and set(barriers) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(("fmt", "per_weight"), [("bf16", 2.0), ("fp8", 1.0), ("int4", 0.5)])
def test_gemv_bytes_follow_the_format(fmt, per_weight):
    w = tool._weights(TINY, fmt, torch.bfloat16, device="cpu", group=16)
    got = tool._gemv_bytes(w)
    hidden, heads, kv, d, inter = TINY[:5]
    weights = {"qkv": (heads + 2 * kv) * d * hidden, "o": hidden * heads * d, "gate_up": 2 * inter * hidden,
               "down": hidden * inter}
    for name, n in weights.items():
        extra = got[name] - n * per_weight  # fp8's row scales, INT4's group scales and zeros
        assert 0 <= extra <= (n // 16 * 4 if fmt == "int4" else n // 16), (name, got[name])


def test_a_moe_layer_counts_its_chosen_experts_rows():
    w = tool._weights((64, 4, 2, 16, 32, False, (8, 2)), "bf16", torch.bfloat16, device="cpu")
    got = tool._gemv_bytes(w)
    assert got["router"] == 8 * 64 * 2 and got["gate_up"] == 2 * (2 * 32 * 64) * 2 and got["down"] == 2 * 64 * 32 * 2
