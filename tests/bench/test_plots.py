"""Benchmark plots: the decode curve panels (tok/s and step time) in the dependency-free SVG form."""

from meshserve.bench.plots import plot_decode_curves


def test_decode_curve_svg_has_both_panels_and_every_series(tmp_path):
    curves = {"llama-3.1-8b": {1: 168.0, 8: 1238.9, 256: 23464.4}, "qwen3-0.6b": {1: 784.2, 256: 65729.2}}
    path = plot_decode_curves(str(tmp_path / "curve.svg"), curves)
    svg = open(path).read()
    assert path.endswith(".svg")
    assert svg.count("<polyline") == 4  # two series in each of two panels
    assert "decode tok/s" in svg and "decode step time (ms)" in svg
    assert svg.count("llama-3.1-8b") == 2 and svg.count("qwen3-0.6b") == 2
