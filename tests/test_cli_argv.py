"""vLLM's spellings of a command line (cli_argv.normalize_argv): underscores in flag names, dotted JSON keys."""

import json

import pytest

from meshserve.cli import build_parser
from meshserve.cli_argv import normalize_argv


def test_underscores_in_flag_names_become_dashes_but_values_stay():
    assert normalize_argv(["serve", "m", "--max_model_len", "4096", "--served_model_name=my_model",
                           "--chat-template", "a_b.jinja"]) == [
        "serve", "m", "--max-model-len", "4096", "--served-model-name=my_model", "--chat-template", "a_b.jinja"]


def test_dotted_keys_merge_into_one_json_flag():
    out = normalize_argv(["serve", "m", "--speculative-config.method", "ngram",
                          "--speculative_config.num_speculative_tokens=4", "-cc.mode=3",
                          "--speculative-config.draft.sizes+", "1,2", "--port", "8001"])
    assert out[:5] == ["serve", "m", "--port", "8001", "--speculative-config"]
    assert json.loads(out[5]) == {"method": "ngram", "num_speculative_tokens": 4, "draft": {"sizes": ["1", "2"]}}
    assert out[6:] == ["-cc", json.dumps({"mode": 3})]


@pytest.mark.parametrize("argv", [["serve", "m", "--temperature=-0.5"], ["plan", "x", "--qps", "-0.5"],
                                  ["serve", "m", "--", "--a_b.c", "1"], ["generate", "--prompt", "a.b_c"]])
def test_values_numbers_and_what_follows_a_double_dash_pass_unchanged(argv):
    assert normalize_argv(argv) == argv


def test_a_vllm_command_line_parses_as_its_meshserve_spelling():
    vllm = ["serve", "m", "--max_model_len=2048", "--speculative-config.method", "ngram",
            "--speculative-config.num_speculative_tokens", "3", "--speculative-config.prompt_lookup_max", "4"]
    ours = ["serve", "m", "--max-model-len=2048", "--speculative-config",
            '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}']
    argv = normalize_argv(vllm)
    got, want = build_parser(argv).parse_args(argv), build_parser(ours).parse_args(ours)
    assert got.max_model_len == want.max_model_len == 2048
    assert json.loads(got.speculative_config) == json.loads(want.speculative_config)
