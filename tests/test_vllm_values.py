"""vLLM's spellings of flag values (meshserve/vllm_values.py) parse to what vLLM makes of them."""

from __future__ import annotations

import argparse

import pytest

from meshserve.cli import build_parser
from meshserve.vllm_values import human_int


@pytest.mark.parametrize("text,value", [("4096", 4096), ("32k", 32_000), ("32K", 32_768), ("25.6k", 25_600),
                                        ("1m", 1_000_000), ("1M", 1 << 20), (" 2K ", 2048)])
def test_human_readable_integers(text, value):
    assert human_int(text) == value


@pytest.mark.parametrize("text", ["2.5K", "32q", "k", ""])
def test_bad_integers_are_argparse_errors(text):
    with pytest.raises(argparse.ArgumentTypeError):
        human_int(text)


def test_serve_and_generate_take_vllm_s_spellings():
    for argv in (["serve", "--dtype", "half", "--max-model-len", "8K", "--max-num-batched-tokens", "16k"],
                 ["generate", "--dtype", "half", "--max-model-len", "8K", "--max-num-batched-tokens", "16k", "hi"]):
        ns = build_parser(argv).parse_args(argv)
        assert (ns.dtype, ns.max_model_len, ns.max_num_batched_tokens) == ("float16", 8192, 16000)
    ns = build_parser(["serve"]).parse_args(["serve", "--dtype", "float", "-asc", "3"])
    assert ns.dtype == "float32" and ns.api_server_count == 3
