"""The meshserve command line: generate with flags, and one-line errors."""

import subprocess
import sys

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


def test_bad_sampling_flag_is_one_line_error(tiny_model_dir, capsys):
    rc = main(["generate", "--model", tiny_model_dir("llama"), "--top-p", "2", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "top_p" in err and "\n" not in err


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
    import pytest

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "(default: 8000)" in out and "(default: 256)" in out
