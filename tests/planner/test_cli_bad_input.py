"""`meshserve plan`'s bad input: one `meshserve: error:` line naming the flag and exit 2 (an --efficiency of 0
was a ZeroDivisionError traceback, a malformed --hardware-file a TypeError one, a pinned layout that cannot use
the GPUs an unexplained 'no fit', NaN and out-of-range numbers a table of nan)."""

from __future__ import annotations

import pytest

from meshserve.cli import main


@pytest.mark.parametrize("flags,message", [
    (["--efficiency", "0"], "--efficiency is a fraction of the GPU's peak in (0, 1], got 0.0"),
    (["--efficiency", "nan"], "--efficiency is a fraction of the GPU's peak in (0, 1], got nan"),
    (["--efficiency", "5"], "--efficiency is a fraction of the GPU's peak in (0, 1], got 5.0"),
    (["--max-model-len", "0"], "--max-model-len must be at least 1, got 0"),
    (["--tp", "0"], "--tp must be at least 1, got 0"),
    (["--dp", "-1"], "--dp must be at least 1, got -1"),
    (["--tp", "3"], "--tp/--pp/--dp pin 3 GPUs per layout, which cannot use all --num-gpus 1"),
    (["--num-gpus", "4", "--tp", "2", "--pp", "1", "--dp", "1"], "pin 2 GPUs per layout"),
    (["--pp", "2", "--num-gpus", "2", "--pp-host-step-ms", "nan"], "--pp-host-step-ms must be >= 0 and finite"),
    (["--claim", "-5"], "--claim must be a decode rate > 0 tok/s, got -5.0"),
    (["--claim", "nan"], "--claim must be a decode rate > 0 tok/s, got nan"),
])
def test_bad_plan_flags_are_one_line(flags, message, capsys):
    assert main(["plan", "smollm2-135m", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("meshserve: error: ") and message in captured.err
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize("toml,message", [
    ("[gpus]\nfoo = 3\n", "gpus.foo must be a table ([gpus.foo] with its fields), got int"),
    ("gpus = 3\n", "[gpus] and [defaults] must be tables"),
    ('[gpus.H200]\nhbm_gb_s = "fast"\n', "gpus.H200.hbm_gb_s must be a number >= 0, got 'fast'"),
    ("[gpus.H200]\nmemory_gib = -1\n", "gpus.H200.memory_gib must be a number >= 0, got -1"),
    # what the planner divides by: 0 was a ZeroDivisionError traceback, inf an OverflowError one
    ("[gpus.H200]\nhbm_gb_s = 0\n", "gpus.H200.hbm_gb_s must be a number > 0, got 0"),
    ("[gpus.H200]\nbf16_tflops = 0\n", "gpus.H200.bf16_tflops must be a number > 0, got 0"),
    ("[gpus.H200]\ngpus_per_node = 0\n", "gpus.H200.gpus_per_node must be a number > 0, got 0"),
    ("[gpus.H200]\ninter_node_gb_s = 0\n", "gpus.H200.inter_node_gb_s must be a number > 0, got 0"),
    ("[gpus.H200]\nmemory_gib = inf\n", "gpus.H200.memory_gib must be a number >= 0, got inf"),
    ("[gpus.H200]\nhbm_gb_s = nan\n", "gpus.H200.hbm_gb_s must be a number >= 0, got nan"),
    ("[gpus.H200]\ngpus_per_node = 2.5\n", "gpus.H200.gpus_per_node must be a whole number, got 2.5"),
    # above 1 it predicted decode faster than the roofline (--efficiency refuses it)
    ("[gpus.H200]\nefficiency = 3.0\n", "gpus.H200.efficiency must be a fraction of the GPU's peak in (0, 1]"),
    ("[gpus.H200]\nefficiency = 0\n", "gpus.H200.efficiency must be a fraction of the GPU's peak in (0, 1]"),
    ("[gpus.H200]\naliases = 5\n", "gpus.H200.aliases must be a list of regexes (strings), got 5"),
    ('[gpus.H200]\naliases = ["H200("]\n', "gpus.H200.aliases: 'H200(' is not a valid regex"),
    # "GpuSpec.__init__() missing 7 required positional arguments: ..."
    ("[gpus.X]\nmemory_gib = 80\n", "gpus.X is a new GPU: it needs hbm_gb_s, bf16_tflops, link, link_gb_s"),
])
def test_a_malformed_hardware_file_is_one_line(toml, message, tmp_path, capsys):
    path = tmp_path / "gpus.toml"
    path.write_text(toml)
    assert main(["plan", "smollm2-135m", "--gpu", "H200", "--hardware-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"meshserve: error: hardware file {path}") and message in err, err


def test_all_sizes_pinned_still_plans_and_hints():
    """The pinned-layout check is the command line's: the no-fit hint re-plans on more GPUs with the same pins."""
    assert main(["plan", "llama-3.1-70b", "--tp", "1", "--pp", "1", "--dp", "1"]) == 1


def test_a_max_model_len_beyond_the_model_s_context_is_refused(capsys):
    """It planned (and hinted lengths) the engine refuses: serve stops at max_position_embeddings."""
    assert main(["plan", "smollm2-135m", "--max-model-len", "100000"]) == 2
    assert "--max-model-len 100,000 exceeds smollm2-135m's context of 8,192 tokens" in capsys.readouterr().err
    assert main(["plan", "smollm2-135m", "--max-model-len", "8192"]) == 0


def test_an_empty_gpu_name_is_refused_not_detected(capsys):
    """`--gpu ""` (an unset shell variable) planned silently for the detected or default GPU."""
    assert main(["plan", "smollm2-135m", "--gpu", ""]) == 2
    assert "unknown GPU ''; known: " in capsys.readouterr().err


def test_a_huge_max_num_seqs_still_plans(capsys):
    """Its logits were sized per sequence past the step's token budget: 51 TB for the 8B at 10^8, no fit and no
    hint."""
    assert main(["plan", "llama-3.1-8b", "--gpu", "H200", "--max-num-seqs", "100000000"]) == 0
    assert "TP=1: the only layout that fits" in capsys.readouterr().out


def test_a_folder_without_config_json_says_so(tmp_path, capsys):
    """It said the folder was neither a preset, an HF id nor a config.json path (plan and simulate alike)."""
    assert main(["plan", str(tmp_path)]) == 2
    assert f"model {str(tmp_path)!r}: the folder has no config.json" in capsys.readouterr().err
