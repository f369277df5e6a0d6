"""Autoscaling on the router's queue depth (deploy/k8s/autoscaling-keda.yaml's rule)."""

from __future__ import annotations

import json

import pytest

from meshserve.cli import main
from meshserve.simulator.autoscale import AutoscaleRule
from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.trace import SimRequest, poisson_trace


def test_desired_replicas_is_the_routers():
    rule = AutoscaleRule(target_queue_per_replica=16, min_replicas=1, max_replicas=8)
    assert [rule.desired(d) for d in (0, 1, 16, 17, 64, 1000)] == [1, 1, 1, 2, 4, 8]


def test_scales_out_for_a_surge_and_back_in_after_it():
    """A surge one replica cannot serve, then a trickle: replicas start (after start-up), serve, then drain
    and stop once the cooldown has passed; GPU time counts only the replicas that were up."""
    surge = poisson_trace(70.0, 25.0, 1)
    trickle = [SimRequest(25.0 + r.arrival_s, r.prompt_len, r.output_len) for r in poisson_trace(1.0, 100.0, 2)]
    rule = AutoscaleRule(max_replicas=4, polling_s=2.0, cooldown_s=30.0, startup_s=6.0)
    config = SimConfig(gpu="H100-SXM")
    scaled = simulate(config, surge + trickle, autoscale=rule)
    fixed = simulate(config, surge + trickle)
    timeline = scaled["autoscale"]["timeline"]
    assert scaled["autoscale"]["max_replicas_up"] == 4
    first_ready = next(p["t"] for p in timeline if p["serving"] > 1)
    first_asked = next(p["t"] for p in timeline if p["starting"] > 0)
    assert first_ready - first_asked == pytest.approx(rule.startup_s, abs=rule.polling_s)
    assert timeline[-1]["serving"] == 1  # back to one after the surge
    assert scaled["ttft_p50"] < fixed["ttft_p50"] and scaled["goodput"] > fixed["goodput"]
    duration = scaled["duration_s"]
    assert duration / 3600 < scaled["gpu_hours"] < 4 * duration / 3600
    assert simulate(config, surge + trickle, autoscale=rule) | {"sim_wall_s": 0} == scaled | {"sim_wall_s": 0}


def test_autoscale_flag(capsys):
    assert main(["simulate", "--gpu", "H100-SXM", "--arrivals", "bursty", "--qps", "30", "--duration", "60",
                 "--burst-period", "60", "--burst-duty", "0.3", "--autoscale", "--max-replicas", "3",
                 "--polling-s", "5", "--startup-s", "10", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["autoscale"]["max_replicas_up"] > 1 and report["autoscale"]["timeline"]
    assert main(["simulate", "--autoscale", "--min-replicas", "3", "--max-replicas", "2", "--no-progress"]) == 2


def test_gpu_hours_by_hand():
    """Three 2.25 s requests (18 steps of 0.125 s, one at a time) at t=0 on one TP=2 replica, one request per
    replica wanted, polls every 1 s, ready 0.5 s after asked, no cooldown. Polls: t=1 depth 3, two replicas
    asked (GPUs taken from then); t=3 depth 2, the newest drains; t=4 it is freed (3 s); t=5 depth 1, the next
    drains; t=6 it is freed (5 s); the first runs to the last completion at 6.75 s."""
    trace = [SimRequest(0.0, 100, 18) for _ in range(3)]
    rule = AutoscaleRule(target_queue_per_replica=1, max_replicas=3, polling_s=1.0, cooldown_s=0.0, startup_s=0.5)
    config = SimConfig(gpu="H200", num_gpus=2, tp=2, num_blocks=4096, max_num_seqs=1, frontend_request_s=0.0,
                       frontend_token_s=0.0)
    report = simulate(config, trace, step_cost=lambda shape: 0.125, autoscale=rule)
    assert report["duration_s"] == pytest.approx(6.75)
    assert [p["serving"] for p in report["autoscale"]["timeline"]] == [1, 1, 3, 2, 2, 1, 1]
    gpu_hours = (6.75 + 3 + 5) * 2 / 3600
    assert report["gpu_hours"] == pytest.approx(gpu_hours)
    assert report["cost"]["usd"] == pytest.approx(gpu_hours * report["cost"]["usd_per_gpu_hour"])
    assert report["cost"]["usd_per_million_output_tokens"] == pytest.approx(report["cost"]["usd"] / (3 * 18) * 1e6)
    # all three stay on the first replica (the only one at t=0): done at 2.25, 4.5 and 6.75 s; in flight per
    # replica held divides their 13.5 request-seconds by the 14.75 replica-seconds
    assert report["in_flight_mean"] == pytest.approx(13.5 / 6.75)
    assert report["in_flight_per_replica"] == pytest.approx(13.5 / 14.75)
