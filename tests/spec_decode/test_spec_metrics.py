"""Acceptance counters: SpecDecodeStats arithmetic and the /metrics series named after vLLM's."""

from __future__ import annotations

from meshserve.serve.metrics import ServerMetrics
from meshserve.spec_decode.stats import SpecDecodeStats


def test_acceptance_rate_and_mean_length():
    s = SpecDecodeStats()
    s.observe(4, 4)
    s.observe(4, 1)
    s.observe(2, 0)
    assert s.num_drafts == 3 and s.num_draft_tokens == 10 and s.num_accepted_tokens == 5
    assert s.acceptance_rate == 0.5
    assert s.mean_acceptance_length == 1 + 5 / 3
    assert s.num_accepted_tokens_per_pos == [2, 1, 1, 1]


def test_prometheus_series():
    stats = {
        "spec_num_drafts": 3,
        "spec_num_draft_tokens": 10,
        "spec_num_accepted_tokens": 5,
        "spec_num_accepted_tokens_per_pos": [2, 1, 1, 1],
    }
    text = ServerMetrics().render((stats, 0.1)).decode()
    labels = 'engine="0",model_name="meshserve"'
    assert f"vllm:spec_decode_num_drafts_total{{{labels}}} 3.0" in text
    assert f"vllm:spec_decode_num_draft_tokens_total{{{labels}}} 10.0" in text
    assert f"vllm:spec_decode_num_accepted_tokens_total{{{labels}}} 5.0" in text
    assert f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{labels},position="0"}} 2.0' in text


def test_no_spec_decode_series_without_speculation():
    """As vLLM's: the spec_decode counters exist only when speculative decoding is configured."""
    assert "spec_decode" not in ServerMetrics().render(({"num_running": 1}, 0.1)).decode()
