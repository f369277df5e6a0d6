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
    wanted = {m for e in exprs for m in re.findall(r"(?:meshserve|vllm):[a-z0-9_]+", e)}
    exported = {line.split("{")[0].split(" ")[0]
                for line in httpx.get(live.base_url + "/metrics", timeout=10).text.splitlines()
                if line.startswith(("meshserve:", "vllm:"))}
    assert wanted and wanted <= exported, wanted - exported
    for needed in ("meshserve:requests_slo_total", "meshserve:requests_rejected_total",
                   "meshserve:step_time_predicted_seconds", "meshserve:step_time_actual_seconds",
                   "meshserve:admission_margin", "meshserve:admission_margin_updates_total",
                   "meshserve:admission_margin_ttft_error"):
        assert needed in wanted
    # vLLM's series under vLLM's names (its dashboards' queries work as they are)
    for needed in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                   "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total"):
        assert needed in wanted
    # the per-request histograms (vLLM's phases, TPOT, prefill KV computed), p50 and p99 of each
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds", "request_time_per_output_token_seconds",
                 "request_prefill_kv_computed_tokens"):
        quantiles = {q for e in exprs if f"vllm:{name}_bucket" in e
                     for q in re.findall(r"histogram_quantile\(([0-9.]+),", e)}
        assert quantiles == {"0.5", "0.99"}, name


def test_panels_have_their_own_ids_and_places():
    """Unique ids, and no two panels overlap on Grafana's 24-column grid."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    taken: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, (p["title"], taken.get((x, y)))
                taken[(x, y)] = p["title"]
