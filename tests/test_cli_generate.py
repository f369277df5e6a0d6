"""The meshserve command line: generate with flags, and one-line errors."""

import subprocess
import sys

import pytest

from meshserve.cli import main


def test_generate_prints_completion(tiny_model_dir, capsys):
    rc = main(["generate", "--model", tiny_model_dir("llama"), "--max-tokens", "4", "--no-chat",
               "--ignore-eos", "Hello world"])
    assert rc == 0
    assert capsys.readouterr().out.strip() != ""


def test_generate_chat_and_several_prompts(tiny_model_dir, capsys):
    rc = main(["generate", "--model", tiny_model_dir("qwen3"), "--max-tokens", "3", "--chat", "--n", "2",
               "--temperature", "0.8", "--sampling-seed", "1", "--ignore-eos", "hi", "there"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("--- 'hi'") == 2 and out.count("--- 'there'") == 2


def test_bad_model_is_one_line_error(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "missing"), "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("meshserve: error: model not found") and "\n" not in err


def test_a_dummy_preset_without_a_tokenizer_is_one_line_error_before_loading(capsys, monkeypatch, tmp_path):
    # README's `meshserve generate --model PRESET --load-format dummy`: text prompts need --tokenizer, said at once
    import meshserve.entrypoints.llm as llm_module

    monkeypatch.setattr(llm_module, "LLM", None)  # nothing may load
    rc = main(["generate", "--model", "smollm2-135m", "--load-format", "dummy", "--no-chat", "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--tokenizer DIR" in err and "meshserve bench tokenizer" in err and "\n" not in err


def test_bad_sampling_flag_is_one_line_error(tiny_model_dir, capsys):
    model = tiny_model_dir("llama")
    capsys.readouterr()  # the fixture's own output where it writes the checkpoint (run alone: a progress bar)
    rc = main(["generate", "--model", model, "--top-p", "2", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "top_p" in err and "\n" not in err


@pytest.mark.parametrize("env,value", [("MESHSERVE_FP8_V_LAYOUT", "sideways"), ("MESHSERVE_ATTENTION_BACKEND", "foo")])
def test_a_bad_kernel_switch_is_one_line_error(env, value, tiny_model_dir, monkeypatch, capsys):
    # the environment's kernel switches are checked when the engine selects its kernels, at start
    monkeypatch.setenv(env, value)
    model = tiny_model_dir("llama")
    capsys.readouterr()  # (as above)
    rc = main(["generate", "--model", model, "--max-tokens", "2", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("meshserve: error: ") and value in err and "\n" not in err


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "meshserve.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "meshserve" in proc.stdout


def test_stop_token_ids_leave_the_prompt_alone_and_logprobs_are_printed(tiny_model_dir, capsys):
    rc = main(["generate", "--model", tiny_model_dir("llama"), "--max-tokens", "3", "--no-chat", "--ignore-eos",
               "--stop-token-ids", "2,7", "--logprobs", "2", "Hello world"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    per_token = [line for line in lines if line.startswith("  '")]
    assert len(per_token) == 3 and all(line.count("|") == 1 for line in per_token)  # chosen | 2 alternatives


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "(default: 8000)" in out and "(default: 256)" in out


def _choices(out: str) -> list[list[str]]:
    """Each completion's per-token lines (printed by --logprobs 0): a list per `--- 'prompt' [i]` block."""
    blocks: list[list[str]] = []
    for line in out.splitlines():
        if line.startswith("--- "):
            blocks.append([])
        elif line.startswith("  '") and blocks:
            blocks[-1].append(line)
    return blocks


def _generate(capsys, model: str, *flags: str) -> list[list[str]]:
    assert main(["generate", "--model", model, "--no-chat", "--n", "2", "--ignore-eos", "--logprobs", "0",
                 *flags, "Hello world"]) == 0
    return _choices(capsys.readouterr().out)


def test_generate_takes_the_models_defaults_like_the_server(greedy_model, capsys):
    choices = _generate(capsys, greedy_model)
    assert [len(c) for c in choices] == [5, 5] and choices[0] == choices[1]  # greedy, max_new_tokens


def test_generate_flags_override_the_models_defaults(greedy_model, capsys):
    choices = _generate(capsys, greedy_model, "--temperature", "1.0", "--sampling-seed", "0",
                        "--max-tokens", "8")
    assert [len(c) for c in choices] == [8, 8] and choices[0] != choices[1]


def test_generate_with_generation_config_vllm_ignores_them(greedy_model, capsys):
    choices = _generate(capsys, greedy_model, "--generation-config", "vllm", "--max-tokens", "6")
    assert [len(c) for c in choices] == [6, 6] and choices[0] != choices[1]  # temperature 1.0


def test_llm_generate_without_params_uses_the_models_defaults(greedy_model):
    from meshserve import LLM

    llm = LLM(greedy_model, max_model_len=256)
    try:
        params = llm.get_default_sampling_params()
        assert (params.temperature, params.max_tokens) == (0.0, 5)
        out = llm.generate("Hello world", use_tqdm=False)[0].outputs[0]
        assert 1 <= len(out.token_ids) <= 5
    finally:
        llm.shutdown()


def test_help_says_where_sampling_defaults_come_from(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks
    assert "--generation-config {auto,vllm,FOLDER}" in out and "generation_config.json" in out
    assert "0 = greedy (default: the model's, else 1.0)" in out and "(default: the model's, else 256)" in out
