"""A simulated run over time: requests waiting and running (and replicas, when autoscaled), as PNG or SVG."""

from __future__ import annotations

from meshserve.bench.plots import write_line_plots


def plot_timeline(report: dict, path: str) -> str:
    """Write the report's timeline; returns the path written (.svg when matplotlib is missing)."""
    points = report["timeline"]
    ts = [p["t"] for p in points]
    panels = [("requests", {"waiting": (ts, [p["waiting"] for p in points]),
                            "running": (ts, [p["running"] for p in points])})]
    scaled = report.get("autoscale")
    if scaled:
        at = [p["t"] for p in scaled["timeline"]]
        panels.append(("replicas", {"serving": (at, [p["serving"] for p in scaled["timeline"]]),
                                    "starting": (at, [p["starting"] for p in scaled["timeline"]]),
                                    "desired": (at, [p["desired"] for p in scaled["timeline"]])}))
    return write_line_plots(path, panels, "simulated seconds", log_y=False)
