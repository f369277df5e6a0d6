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


@pytest.mark.parametrize(
    "key, hint",
    [("quantization", "quantization_config"), ("max_model_len", "--max-model-len"), ("revision", "local")],
)
def test_vllm_keys_without_a_field_say_what_to_use_instead(key, hint):
    """They were 'unknown key(s)' with the list of known keys, which names no way to get what was asked."""
    for value in ({"method": "ngram", "num_speculative_tokens": 2, key: 1},
                  f'{{"method": "ngram", "num_speculative_tokens": 2, "{key}": 1}}'):
        with pytest.raises(InvalidArgumentError, match=f"^speculative_config.{key}: not supported: .*{hint}"):
            parse_speculative_config(value)


def test_a_model_without_method_is_named_like_vllm_does():
    """vLLM takes a model named *eagle3* for an EAGLE-3 head: meshserve loaded it as a draft model and failed
    with "unsupported model architecture LlamaForCausalLMEagle3", as if the target were at fault."""
    assert parse_speculative_config({"model": "/m/EAGLE3-LLaMA3.1-8B", "num_speculative_tokens": 2}).method == "eagle3"
    with pytest.raises(InvalidArgumentError, match="method 'eagle' is not supported yet"):
        parse_speculative_config({"model": "/m/EAGLE-LLaMA3-8B", "num_speculative_tokens": 2})


def test_draft_tensor_parallel_size_is_1_or_the_targets():
    from meshserve.config import EngineArgs

    spec = {"method": "ngram", "num_speculative_tokens": 2}
    EngineArgs(tensor_parallel_size=2, speculative_config={**spec, "draft_tensor_parallel_size": 1}).validate()
    with pytest.raises(InvalidArgumentError, match="draft_tensor_parallel_size must be 1 or tensor_parallel_size"):
        EngineArgs(speculative_config={**spec, "draft_tensor_parallel_size": 3}).validate()
