"""ServerMetrics: the admission margin's series with several API processes (prometheus_client's multiprocess
files), one series per process, written by each process's own controller."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# One API process: its own margin, driven with `late` x target errors until it updated `updates` times, then
# (`render`) the exposition text a scrape answered by this process returns.
_API_PROCESS = """
import sys
from meshserve.engine.admission_margin import AdmissionMargin, MarginRule
from meshserve.serve.metrics import ServerMetrics

late, updates, render = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "render"
margin = AdmissionMargin(MarginRule(min_samples=16, update_every=16))
metrics = ServerMetrics()
metrics.watch_admission_margin(margin)
while margin.num_updates < updates:
    margin.observe(0.7, 0.7 + late, 1.0)
if render:
    sys.stdout.write(metrics.render(None).decode())
"""


def _api_process(metrics_dir, late: float, updates: int, render: bool) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", _API_PROCESS, str(late), str(updates), "render" if render else "-"],
                          check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of each sample of exactly this series name."""
    out = []
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name:
            out.append((series[len(name):], float(value)))
    return out


def test_each_api_process_exports_its_own_margin_and_the_updates_are_summed(tmp_path):
    _api_process(tmp_path, late=0.0, updates=2, render=False)  # accurate predictions: opens 0.8 -> 0.9
    text = _api_process(tmp_path, late=0.3, updates=1, render=True)  # late: closes 0.8 -> 0.75
    margins = sorted(v for _, v in _samples(text, "meshserve:admission_margin"))
    assert margins == pytest.approx([0.75, 0.9])
    assert all('pid="' in labels for labels, _ in _samples(text, "meshserve:admission_margin"))
    errors = sorted(v for _, v in _samples(text, "meshserve:admission_margin_ttft_error"))
    assert errors == pytest.approx([0.0, 0.3])
    assert _samples(text, "meshserve:admission_margin_updates_total") == [("", 3.0)]
