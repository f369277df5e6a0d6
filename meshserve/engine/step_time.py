"""How long a step takes on the device, predicted from its shape and corrected by the steps measured.

A step reads every weight once and computes 2 FLOPs per parameter per new token, so its time is roughly
    max(weight bytes / bandwidth, new tokens x 2 x parameters / FLOP/s)  +  KV bytes read / bandwidth  +  overhead
(the planner's arithmetic, meshserve/planner/perf.py), plus, for a step that carries prefill and is larger
than the mixed-step CUDA graphs (engine/mixed_graph.py), the cost of launching every kernel eagerly. The model keeps
those terms as features and learns their weights online, by recursive least squares over the engine's
measured step times, so it starts from the hardware's data sheet and converges to what this build really does
on this GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Defaults when the device is not in the planner's catalog (CPU, unknown GPU): the online fit corrects them.
_UNKNOWN_BANDWIDTH = 50e9
_UNKNOWN_FLOPS = 2e11
_FORGET = 0.995  # recursive least squares: older steps weigh less (half weight after ~140 steps)
# Forgetting divides the covariance by _FORGET every step, so a direction the steps never excite (the mixed-step
# term while every step is graphed) grows by 1/_FORGET a step: 9 x 1.005^n overflowed float64 after ~141,000
# steps (a 14-minute CPU fuzz run; ~25 minutes of a GPU server's decode), and the fit went NaN, every prediction
# with it (SLO admission refused everyone). Each coordinate's spread is capped at this many times its prior's.
_SPREAD_CAP = 100.0


@dataclass(frozen=True)
class StepShape:
    """What decides a step's device time: new tokens (prefill chunks + one per decode) and KV tokens read."""

    num_tokens: int
    num_seqs: int
    context_tokens: int  # sum over the step's sequences of their length once the step is done

    @classmethod
    def of(cls, scheduled) -> StepShape:
        """The shape of a step's scheduled sequences (ScheduledSequence, or the simulator's light entries), in one
        pass over them."""
        num_tokens = context = 0
        for e in scheduled:
            n = e.num_new_tokens
            num_tokens += n
            context += e.num_computed_tokens + n
        return cls(num_tokens, len(scheduled), context)


@dataclass(frozen=True)
class DeviceRates:
    """Bandwidth (bytes/s) and dense FLOP/s of the device the model runs on."""

    bandwidth: float
    flops: float

    @classmethod
    def detect(cls, device: str, dtype: str) -> DeviceRates:
        """From the planner's GPU catalog when it knows this GPU, else conservative defaults."""
        if device.startswith("cuda"):
            import torch

            from meshserve.planner.hardware import load_catalog, match_device_name

            spec = match_device_name(torch.cuda.get_device_name(torch.device(device)), load_catalog())
            if spec is not None:
                return cls(spec.hbm_bytes_per_s, spec.flops_per_s("fp8" if "8" in dtype else "bf16"))
        return cls(_UNKNOWN_BANDWIDTH, _UNKNOWN_FLOPS)


def step_weights(hf_config, weight_bytes: float, num_ranks: int) -> tuple[float, float | None]:
    """(bytes a step reads, parameters it multiplies by) on one of num_ranks model shards: an MoE step reads
    only its top-k experts (the planner's active / total parameters), and a quantized model holds fewer
    bytes than 2 per parameter. Falls back to (weight_bytes, None) for a config the planner cannot read."""
    from meshserve.errors import InvalidArgumentError
    from meshserve.planner.model import model_from_config

    try:
        spec = model_from_config(hf_config.to_dict())
    except (InvalidArgumentError, AttributeError, TypeError, ValueError):
        return weight_bytes, None
    active = spec.active_params / max(1, num_ranks)
    return weight_bytes * spec.active_params / spec.total_params, active


class StepTimeModel:
    """Predicted seconds of a step from its StepShape; `observe()` refines it with measured steps."""

    def __init__(self, weight_bytes: float, kv_bytes_per_token: float, rates: DeviceRates,
                 overhead_s: float = 1e-3, efficiency: float = 0.8, params: float | None = None,
                 graphed_mixed_tokens: int = 0):
        """weight_bytes: what a step reads of this rank's weights; params: the weights it multiplies by
        (default weight_bytes / 2, 16-bit weights; see step_weights for quantized and MoE models);
        graphed_mixed_tokens: the largest mixed step that replays a CUDA graph (0: every mixed step runs
        eagerly), so the eager-launch term applies only above it."""
        self.graphed_mixed_tokens = graphed_mixed_tokens
        self.weight_bytes = weight_bytes
        self.params = params if params is not None else weight_bytes / 2
        self.kv_bytes_per_token = kv_bytes_per_token
        self.rates = rates
        # weights of (1, dense term, KV term), fitted in milliseconds so the three are of one scale: the
        # prior is the data sheet at `efficiency` plus a fixed overhead
        self.theta = np.array([overhead_s * 1e3, 1.0 / efficiency, 1.0 / efficiency, 0.0])
        self._theta = tuple(float(v) for v in self.theta)
        # the prior's spread: about 2 ms on the overhead, 0.5 on each efficiency factor, 3 ms on the mixed-step cost
        self._p_prior = np.diag([4.0, 0.25, 0.25, 9.0])
        self._p = self._p_prior.copy()
        self._p_cap = _SPREAD_CAP * np.diag(self._p)
        self.num_spread_restarts = 0
        self.num_observed = 0
        self.last_predicted_s = 0.0
        self.last_actual_s = 0.0
        self.abs_error_ewma = 0.0  # mean |predicted - actual| / actual over recent steps

    def dense_s(self, num_tokens: int) -> float:
        """Seconds of a step's dense term at the data sheet's rates: its weight bytes or its FLOPs.

        The FLOPs count every parameter once per token, embedding and LM head included, where the true count is
        the layers per token and the head per sampled sequence (ModelSpec.matmul_flops). Kept on purpose: the
        head's share is a constant fraction of a prefill token's FLOPs, which the fitted dense factor absorbs;
        refitting the W3 traces with the true count (2026-12-06) left the mean error where it was (8B 1.94 ->
        1.98%, Qwen3-0.6B 6.30 -> 6.33%) and moved the 8B's constant below zero, so calibration.toml stays."""
        return max(self.weight_bytes / self.rates.bandwidth, 2.0 * self.params * num_tokens / self.rates.flops)

    def _terms(self, shape: StepShape) -> tuple[float, float, float]:
        """The terms besides the constant: dense (weights or FLOPs) and KV reads in milliseconds at the data
        sheet's rates, and 1 for a step that carries prefill and runs eagerly (past the mixed graphs)."""
        dense = self.dense_s(shape.num_tokens)
        return (1e3 * dense, 1e3 * shape.context_tokens * self.kv_bytes_per_token / self.rates.bandwidth,
                1.0 if shape.num_seqs < shape.num_tokens > self.graphed_mixed_tokens else 0.0)

    def floor(self, shape: StepShape) -> float:
        """The fastest this step can be: its weight and KV bytes read at the data sheet's bandwidth (no fit)."""
        if shape.num_tokens == 0:
            return 0.0
        return (self.weight_bytes + shape.context_tokens * self.kv_bytes_per_token) / self.rates.bandwidth

    def predict(self, shape: StepShape) -> float:
        if shape.num_tokens == 0:
            return 0.0
        dense, kv, mixed = self._terms(shape)  # plain floats: this runs many times per step
        t0, t1, t2, t3 = self._theta
        return max(t0 + t1 * dense + t2 * kv + t3 * mixed, 0.0) * 1e-3

    def observe(self, shape: StepShape, actual_s: float) -> None:
        """Fold one measured step into the fit (recursive least squares with forgetting)."""
        if shape.num_tokens == 0 or not 0 < actual_s < float("inf"):
            return
        x = np.array([1.0, *self._terms(shape)])
        predicted_ms, actual_ms = float(x @ self.theta), actual_s * 1e3
        px = self._p @ x
        xpx = float(x @ px)
        if not 0.0 <= xpx < float("inf"):  # x'Px < 0: P lost positive definiteness in rounding (below)
            self._restart_spread()
            px = self._p @ x
            xpx = float(x @ px)
        gain = px / (_FORGET + xpx)
        self.theta = self.theta + gain * (actual_ms - predicted_ms)
        p = (self._p - np.outer(gain, px)) / _FORGET
        # outer(gain, px) is symmetric only up to rounding, and forgetting amplifies what a direction the steps
        # hardly excite carries: left alone, P drifted asymmetric and indefinite within ~8,000 varied, noisy
        # steps (a slow test's; a negative variance, then NaN through the cap's square root)
        p = (p + p.T) * 0.5
        spread = np.diag(p)
        if not (spread > 0.0).all():
            self._restart_spread()
        elif (spread > self._p_cap).any():  # (this runs every step: scale only when a cap is passed)
            # the cap as a congruence D P D (D diagonal, positive): still symmetric positive definite, each capped
            # coordinate's variance at its cap and its covariances scaled with it; the others untouched
            scale = np.sqrt(np.minimum(1.0, self._p_cap / spread))
            self._p = p * np.outer(scale, scale)
        else:
            self._p = p
        self._theta = tuple(float(v) for v in self.theta)
        self.num_observed += 1
        predicted = max(predicted_ms, 0.0) * 1e-3
        self.last_predicted_s, self.last_actual_s = predicted, actual_s
        err = abs(predicted - actual_s) / actual_s
        self.abs_error_ewma = err if self.num_observed == 1 else 0.95 * self.abs_error_ewma + 0.05 * err

    def _restart_spread(self) -> None:
        """Covariance resetting (a standard RLS remedy): the prior's spread again, the fit kept; the next steps
        move it as fast as the first ones did."""
        self._p = self._p_prior.copy()
        self.num_spread_restarts += 1

    def max_prefill_tokens(self, budget_s: float, num_decodes: int, decode_context: int,
                           limit: int = 1 << 20) -> int:
        """The most prefill tokens (at most limit) a step with these decodes can add and still be predicted
        to take at most budget_s; 0 when not even one fits."""

        def fits(p: int) -> bool:
            return self.predict(StepShape(num_decodes + p, num_decodes + 1, decode_context + p)) <= budget_s

        if limit <= 0 or not fits(1):
            return 0
        lo, hi = 1, limit
        while lo < hi:  # the prediction grows with tokens: bisect on the largest that fits
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo
