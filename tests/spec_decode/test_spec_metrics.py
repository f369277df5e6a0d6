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
    assert "meshserve:spec_decode_num_drafts_total 3.0" in text
    assert "meshserve:spec_decode_num_draft_tokens_total 10.0" in text
    assert "meshserve:spec_decode_num_accepted_tokens_total 5.0" in text
    assert 'meshserve:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 2.0' in text
