"""The step-time model: the data-sheet prior, online fitting to measured steps, and the prefill budget."""

from __future__ import annotations

import random

from meshserve.engine.step_time import DeviceRates, StepShape, StepTimeModel

RATES = DeviceRates(bandwidth=1e12, flops=1e14)


def _model() -> StepTimeModel:
    return StepTimeModel(weight_bytes=2e9, kv_bytes_per_token=1e5, rates=RATES)


def test_prior_is_the_data_sheet_with_overhead():
    m = _model()
    decode = m.predict(StepShape(num_tokens=8, num_seqs=8, context_tokens=8000))
    # 2 GB of weights at 1 TB/s = 2 ms, 0.8 GB of KV = 0.8 ms, at 80% efficiency, plus 1 ms
    assert abs(decode - (1e-3 + (2e-3 + 0.8e-3) / 0.8)) < 1e-9
    prefill = m.predict(StepShape(num_tokens=4096, num_seqs=1, context_tokens=4096))
    assert prefill > decode * 10  # compute-bound: 2 x 1e9 params x 4096 tokens / 1e14 FLOP/s = 82 ms
    assert m.predict(StepShape(0, 0, 0)) == 0.0


def test_online_fit_converges_to_what_the_device_does():
    m = _model()
    rng = random.Random(0)

    def truth(shape: StepShape) -> float:  # 40% slower than the data sheet, 3 ms of overhead, 4 ms more when mixed
        dense = max(2e9 / 1e12, 2 * 1e9 * shape.num_tokens / 1e14)
        mixed = 4e-3 if shape.num_tokens > shape.num_seqs else 0.0
        return 3e-3 + 1.4 * dense + 1.4 * shape.context_tokens * 1e5 / 1e12 + mixed

    shapes = [StepShape(n, n, n * rng.randint(100, 2000)) for n in (rng.randint(1, 256) for _ in range(150))]
    shapes += [StepShape(p + 16, 17, 16 * 900 + p) for p in (rng.randint(64, 4096) for _ in range(150))]
    rng.shuffle(shapes)
    for shape in shapes:
        m.observe(shape, truth(shape) * rng.uniform(0.98, 1.02))
    probe = [StepShape(64, 64, 64 * 1000), StepShape(2048, 1, 2048), StepShape(200, 8, 9000)]
    assert all(abs(m.predict(s) - truth(s)) / truth(s) < 0.05 for s in probe)
    assert m.abs_error_ewma < 0.05 and m.num_observed == 300


def test_mixed_steps_within_the_graphs_pay_no_eager_term():
    # the eager-launch term applies only to mixed steps larger than the mixed-step CUDA graphs
    m = StepTimeModel(weight_bytes=2e9, kv_bytes_per_token=1e5, rates=RATES, graphed_mixed_tokens=512)
    m.theta[3] = 5.0  # ms for a mixed step run eagerly
    m._theta = tuple(float(v) for v in m.theta)
    small, large = StepShape(300, 20, 20_000), StepShape(1000, 20, 20_000)
    plain = _model()
    plain.theta[3] = 5.0
    plain._theta = tuple(float(v) for v in plain.theta)
    assert abs(plain.predict(small) - m.predict(small) - 5e-3) < 1e-9  # graphed: no eager term
    assert abs(plain.predict(large) - m.predict(large)) < 1e-12  # past the largest bucket: eager
    assert m.predict(StepShape(512, 512, 512)) == plain.predict(StepShape(512, 512, 512))  # decode-only


def test_max_prefill_tokens_is_the_largest_that_fits():
    m = _model()
    budget = 0.030
    p = m.max_prefill_tokens(budget, num_decodes=32, decode_context=32 * 500)
    assert p > 0
    assert m.predict(StepShape(32 + p, 33, 32 * 500 + p)) <= budget
    assert m.predict(StepShape(33 + p, 33, 32 * 500 + p + 1)) > budget
    assert m.max_prefill_tokens(budget, 32, 32 * 500, limit=10) == 10
    assert m.max_prefill_tokens(1e-4, 32, 32 * 500) == 0  # not even the decodes fit


def test_quantized_and_moe_weights_keep_their_parameter_count():
    """FP8 weights halve the bytes a step reads but not the multiplies; an MoE step reads its active experts."""
    from transformers import LlamaConfig, Qwen3MoeConfig

    from meshserve.engine.step_time import step_weights

    dense = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1000)
    nbytes, params = step_weights(dense, 1e6, num_ranks=1)
    assert nbytes == 1e6 and params > 1e6  # 1 MB of 1-byte weights: more parameters than a 16-bit reading
    _, params_tp2 = step_weights(dense, 5e5, num_ranks=2)
    assert params_tp2 == params / 2
    fp8 = StepTimeModel(weight_bytes=1e9, kv_bytes_per_token=1e5, rates=RATES, params=1e9)
    bf16 = StepTimeModel(weight_bytes=2e9, kv_bytes_per_token=1e5, rates=RATES, params=1e9)
    prefill = StepShape(num_tokens=4096, num_seqs=1, context_tokens=4096)
    assert fp8.predict(prefill) == bf16.predict(prefill)  # compute-bound: the same FLOPs
    assert fp8.predict(StepShape(1, 1, 100)) < bf16.predict(StepShape(1, 1, 100))  # bandwidth-bound: half

    moe = Qwen3MoeConfig(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, num_experts=16,
                         num_experts_per_tok=2)
    moe_bytes, _ = step_weights(moe, 1e8, num_ranks=1)
    assert moe_bytes < 0.5e8  # two of sixteen experts per layer


def test_a_long_run_of_one_kind_of_step_keeps_the_fit_finite_and_adaptive():
    """A server decoding for ~25 minutes without an eager mixed step never excites the mixed term: forgetting
    grew its spread by 1/0.995 a step until it overflowed (~141,000 steps, found by a long fuzz run) and the fit
    went NaN, every prediction with it. The spread is capped: after 150,000 decode steps the fit is finite and
    still predicts them, and the first eager mixed steps still teach the mixed term."""
    import math

    m = StepTimeModel(weight_bytes=2e9, kv_bytes_per_token=1e5, rates=RATES, graphed_mixed_tokens=512)
    decode = StepShape(64, 64, 64 * 1000)
    truth = 1.3 * m.predict(decode)
    for _ in range(150_000):
        m.observe(decode, truth)
    assert all(math.isfinite(v) for v in m._theta) and math.isfinite(float(m._p.sum()))
    assert abs(m.predict(decode) - truth) / truth < 0.01
    mixed = StepShape(2000, 20, 20_000)
    eager = m.predict(mixed) + 6e-3  # 6 ms more than the fit says: the eager launches
    for _ in range(30):
        m.observe(mixed, eager)
    assert abs(m.predict(mixed) - eager) / eager < 0.05
    assert abs(m.predict(decode) - truth) / truth < 0.05


def test_the_spread_stays_symmetric_positive_definite_under_varied_noisy_steps():
    """The covariance update subtracts outer(gain, Px), symmetric only up to rounding, and forgetting amplified
    the difference along directions the steps hardly excite: under a mix of small decode steps, mixed steps and
    outliers (a fuzz run's shapes) P went asymmetric and indefinite by step ~7,750 (seed 0), a variance turned
    negative, and the cap's square root made it NaN. Now P is kept symmetric and, were it ever to lose positive
    definiteness in rounding, restarted from the prior."""
    import warnings

    import numpy as np

    rng = random.Random(0)
    m = StepTimeModel(2e6, 1e3, DeviceRates(1e11, 1e12))
    small = rng.random() < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value in sqrt" is the old failure
        for _ in range(9_000):
            if rng.random() < 0.9:
                b = rng.choice([1, 1, 2, 3]) if small else rng.randint(1, 8)
                shape = StepShape(b, b, b * rng.randint(5, 60))
            else:
                t = rng.randint(2, 200)
                shape = StepShape(t, rng.randint(1, min(t, 4)), t + rng.randint(0, 100))
            outlier = rng.random() < 0.05
            m.observe(shape, rng.choice([0.002, 0.0021, 0.05]) if outlier else 0.002 + 1e-6 * shape.num_tokens)
    assert np.array_equal(m._p, m._p.T)
    assert np.linalg.eigvalsh(m._p).min() > 0
    assert np.isfinite(m.theta).all()
    assert abs(m.predict(StepShape(2, 2, 60)) - 0.002) / 0.002 < 0.5  # still a fit of the steps it saw


def test_a_spread_that_lost_positive_definiteness_restarts_from_the_prior():
    import numpy as np

    m = StepTimeModel(weight_bytes=2e9, kv_bytes_per_token=1e5, rates=RATES)
    decode = StepShape(8, 8, 8000)
    truth = 1.2 * m.predict(decode)
    for _ in range(50):
        m.observe(decode, truth)
    theta = m.theta.copy()
    m._p = -np.eye(4)  # what rounding could leave: x'Px < 0, a gain past any bound
    m.observe(decode, truth)
    assert m.num_spread_restarts == 1
    assert np.linalg.eigvalsh(m._p).min() > 0 and np.isfinite(m.theta).all()
    assert np.allclose(m.theta, theta, rtol=0.05)  # the fit is kept, not thrown away
