"""bench latency / throughput arguments: the pipeline layout flags reach the engine and the report."""

from __future__ import annotations

import argparse

import pytest

from meshserve.bench import offline


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    offline.add_offline_parsers(parser.add_subparsers(dest="bench_command"))
    return parser.parse_args(argv)


def test_pp_layer_partition_reaches_the_engine_and_the_layout(monkeypatch):
    ns = _parse(["throughput", "-pp", "2", "--pipeline-depth", "3", "--pp-layer-partition", "17,15",
                 "--pp-token-handoff"])
    seen = {}
    monkeypatch.setattr("meshserve.LLM", lambda **kw: seen.update(kw))
    offline._llm(ns)
    assert (seen["pipeline_parallel_size"], seen["pipeline_depth"], seen["pp_layer_partition"]) == (
        2,
        3,
        [17, 15],
    )
    assert seen["pp_token_handoff"] is True
    assert offline._layout(ns)["pp_layer_partition"] == [17, 15] and offline._layout(ns)["pp_token_handoff"]
    assert "pp_token_handoff" not in offline._layout(_parse(["throughput"]))
    assert "pp_layer_partition" not in offline._layout(_parse(["throughput", "-pp", "2"]))


def test_a_bad_partition_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit):
        _parse(["throughput", "--pp-layer-partition", "17;15"])
    assert "expected layers per stage like 17,15" in capsys.readouterr().err
