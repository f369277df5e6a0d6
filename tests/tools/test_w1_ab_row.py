"""tools/w1_ab_row.py: the six columns tools/w1_ab_device.sh prints for a W1 or W2 result."""

from __future__ import annotations

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "w1_ab_row", pathlib.Path(__file__).resolve().parents[2] / "tools" / "w1_ab_row.py")
w1_ab_row = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(w1_ab_row)


def test_w2_row_lists_every_run_and_its_clock():
    result = {"output_tok_s": 23443.71, "seconds": 5.7141, "seconds_runs": [5.8, 5.7141, 5.6],
              "gpu_clock_runs": [{"sm_mhz_min_median": [1400, 1980], "power_w_median_max": [651.2, 700]},
                                 {"sm_mhz_min_median": [1400, 1965.4], "power_w_median_max": None},
                                 {"sm_mhz_min_median": [1500, 1890], "power_w_median_max": [690, 700]}]}
    assert w1_ab_row.row(result) == ["23443.7", "5.714", "5.80/5.71/5.60", "1980/1965/1890", "651/690", "-"]
    # one run, no nvidia-smi: the missing fields are dashes, still six columns
    assert w1_ab_row.row({"output_tok_s": 1.0, "seconds": 2.0}) == ["1.0", "2.000", "-", "-", "-", "-"]


def test_w1_row_keeps_its_columns():
    result = {"tok_s": 1121.84, "decode_tok_s": 1129.4, "decode_graph_ms": 0.8491, "decode_graph_ms_steps": 0.8642,
              "decode_token_ms": 0.8851, "sm_clock_mhz_min_median": [1980, 1980]}
    assert w1_ab_row.row(result) == ["1121.8", "1129.4", "0.849", "0.864", "0.885", "1980"]
