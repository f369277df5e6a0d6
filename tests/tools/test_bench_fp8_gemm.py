import pytest

from tools.bench_fp8_gemm import PREQUANTIZED, SHAPES, layer_summary


def test_layer_summary_runs_o_through_fp8_linear_and_the_rest_pre_quantized():
    times = {}
    for i, proj in enumerate(SHAPES):
        times.update({(proj, "bf16"): 10.0 * (i + 1), (proj, "quant"): 1.0, (proj, "scaled_mm"): 5.0 * (i + 1),
                      (proj, "fp8"): 5.0 * (i + 1) + 2.0})
    got = layer_summary(times)
    assert got["bf16"] == 100.0 and got["scaled_mm"] == 50.0 and got["quant"] == 4.0
    assert set(PREQUANTIZED) == set(SHAPES) - {"o"}
    assert got["engine_fp8"] == 52.0  # o pays its own quantization pass, the others come quantized
    assert got["speedup"] == pytest.approx(100.0 / 52.0)
