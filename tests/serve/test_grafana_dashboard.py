"""The Grafana dashboard charts series the server really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "meshserve-dashboard.json"


def test_every_series_in_the_dashboard_is_exported(live):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    wanted = {m for e in exprs for m in re.findall(r"meshserve:[a-z0-9_]+", e)}
    exported = {line.split("{")[0].split(" ")[0]
                for line in httpx.get(live.base_url + "/metrics", timeout=10).text.splitlines()
                if line.startswith("meshserve:")}
    assert wanted and wanted <= exported, wanted - exported
    for needed in ("meshserve:requests_slo_total", "meshserve:requests_rejected_total",
                   "meshserve:step_time_predicted_seconds", "meshserve:step_time_actual_seconds",
                   "meshserve:admission_margin", "meshserve:admission_margin_updates_total",
                   "meshserve:admission_margin_ttft_error"):
        assert needed in wanted
