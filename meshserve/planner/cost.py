"""Dollars per million output tokens from the catalog's (assumed) GPU-hour prices."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.planner.hardware import GpuSpec


@dataclass(frozen=True)
class Cost:
    """What a deployment costs to run, and per million generated tokens at its predicted throughput."""

    usd_per_hour: float
    usd_per_million_output_tokens: float
    price_is_assumption: bool


def deployment_cost(gpu: GpuSpec, num_gpus: int, output_tok_per_s: float) -> Cost:
    """num_gpus × price per GPU-hour, spread over the tokens generated in that hour."""
    per_hour = gpu.price_per_hour_usd * num_gpus
    per_million = per_hour / (output_tok_per_s * 3600) * 1e6 if output_tok_per_s > 0 else float("inf")
    return Cost(per_hour, per_million, gpu.price_is_assumption)
