"""--speculative-config: vLLM's keys and defaults, JSON strings, the CLI flag."""

from __future__ import annotations

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.spec_decode.config import SpeculativeConfig, parse_speculative_config


def test_vllm_defaults_for_prompt_lookup():
    c = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 4}')
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (5, 5)
    c = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (3, 3)
    assert c.num_lookahead_tokens == 0 and not c.uses_draft_model


def test_a_model_without_method_is_a_draft_model():
    c = parse_speculative_config({"model": "/x", "num_speculative_tokens": 2})
    assert c == SpeculativeConfig(method="draft_model", num_speculative_tokens=2, model="/x")
    assert c.num_lookahead_tokens == 2
    assert parse_speculative_config(None) is None


@pytest.mark.parametrize(
    "bad",
    [
        [1],
        {"method": "ngram", "num_speculative_tokens": "3"},
        {"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
        {"method": "ngram", "num_speculative_tokens": 2, "model": "/x"},
    ],
)
def test_bad_values(bad):
    with pytest.raises(InvalidArgumentError, match="speculative_config"):
        parse_speculative_config(bad)


def test_cli_flag_reaches_engine_args():
    import argparse

    from meshserve.cli_args import add_engine_args, engine_args_from

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = engine_args_from(
        parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    )
    assert parse_speculative_config(args.speculative_config).num_speculative_tokens == 2
