"""Bad arguments fail in a fraction of a second, before torch is imported or anything loads."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

PROBE = ("import json, sys; from meshserve.cli import main; rc = main(sys.argv[1:]); "
         "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))")


def _run(*argv: str) -> tuple[dict, str]:
    p = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


# PROBE for many command lines from one interpreter start: meshserve.cli is imported once, then each line runs in a
# child forked right there (the state PROBE's process has when it calls main), its stdout and stderr its own
_PROBE_EACH = """
import json, os, sys, tempfile, traceback
from meshserve.cli import main
runs = []
for argv in json.loads(sys.argv[1]):
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            rc = main(argv)
            print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(0)
    os.waitpid(pid, 0)
    out.seek(0); err.seek(0)
    runs.append([out.read(), err.read()])
print(json.dumps(runs))
"""


def _run_each(argvs: list[list[str]]) -> dict[tuple, tuple[dict, str]]:
    """_run for each command line: argv -> (PROBE's result, its stderr)."""
    p = subprocess.run([sys.executable, "-c", _PROBE_EACH, json.dumps(argvs)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    runs = json.loads(p.stdout.strip().splitlines()[-1])
    return {tuple(argv): (json.loads(out.strip().splitlines()[-1]) if out.strip() else None, err)
            for argv, (out, err) in zip(argvs, runs, strict=True)}


REFUSED = [
    (["generate", "--no-chat", ""], "a prompt is empty"),
    (["generate", ""], "a prompt is empty"),  # chat mode too: the model would invent a reply to nothing
    (["generate", "--max-tokens", "-1", "Hi"], "max_tokens"),
    (["serve", "--max-cudagraph-tokens", "-1"], "max_cudagraph_tokens: must be >= 0"),
    (["serve", "/nonexistent/model"], "model not found"),
    (["serve", "llama-3.1-8b"], "--load-format dummy"),
    (["serve", "llama-3.1-8b", "--load-format", "dummy", "-tp", "3"], "not divisible"),
    (["generate", "--model", "qwen3-0.6b", "--load-format", "dummy", "-pp", "40", "Hi"], "exceeds the 28 layers"),
    (["serve", "--tokenizer", "/nonexistent/tok"], "tokenizer folder not found"),
    (["serve", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 99}'], "must be in [1, 32]"),
    (["generate", "--speculative-config", '{"method": "medusa", "num_speculative_tokens": 2}', "Hi"],
     "not supported yet"),
    # these used to fail after the model had loaded (a traceback, or an OSError line without the flag), or not
    # at all (a NaN drain timeout served, then never drained)
    (["serve", "--request-log", "/nonexistent/dir/log.jsonl"], "--request-log /nonexistent/dir/log.jsonl: the folder"),
    (["serve", "--request-log", "/"], "--request-log /: is a folder"),
    (["serve", "--step-trace", "/nonexistent/dir/t.jsonl"], "--step-trace /nonexistent/dir/t.jsonl: the folder"),
    # root passes os.access on /proc: the folder check makes (and removes) a real folder
    (["bench", "tokenizer", "/proc/nope/tok"], "output_dir /proc/nope/tok: /proc is not writable"),
    (["generate", "--kv-offloading-size", "0.1", "--kv-offloading-disk-path", "/etc/hostname",
      "--kv-offloading-disk-size", "0.1", "Hi"], "--kv-offloading-disk-path /etc/hostname: /etc/hostname is a file"),
    (["serve", "--drain-timeout", "nan"], "--drain-timeout must be >= 0, got nan"),
    (["serve", "--served-model-name", ""], "--served-model-name: a name is empty"),
    (["serve", "--api-key", ""], "--api-key: a key is empty"),  # it used to serve without authentication
    (["serve", "--api-key", "k1", " "], "--api-key: a key is empty"),
    (["serve", "--seed", str(1 << 64)], "seed: must fit in 64 bits"),
    (["serve", "--nnodes", "2", "--node-rank", "1", "--master-port", "-1"], "master_port: must be in [1, 65535]"),
    (["serve", "/nonexistent/model", "-dp", "2", "--data-parallel-backend", "router"], "model not found"),
    # served, then every chat request (or every one leaving temperature unset) was answered with a 400
    (["serve", "--chat-template", "{% if %}"],
     "--chat-template: not a valid Jinja template (line 1: Expected an expression"),
    (["serve", "--override-generation-config", '{"temperature": -1}'],
     "--override-generation-config: temperature must be >= 0, got -1"),
    # named the router's own flag (--workers), which serve does not take
    (["serve", "llama-3.1-8b", "--load-format", "dummy", "-dp", "2", "--data-parallel-backend", "router",
      "--router-workers", "0"], "--router-workers must be >= 1, got 0"),
    # one rank in all: the "worker" node served a whole server of its own
    (["serve", "llama-3.1-8b", "--load-format", "dummy", "--nnodes", "2", "--node-rank", "1"],
     "--nnodes 2: the 1 rank(s) of --tensor-parallel-size x --pipeline-parallel-size do not split evenly over 2"),
]


@pytest.fixture(scope="module")
def refused_runs() -> dict[tuple, tuple[dict, str]]:
    return _run_each([argv for argv, _ in REFUSED])


@pytest.mark.parametrize("argv,message", REFUSED)
def test_refused_before_anything_loads(argv, message, refused_runs):
    result, err = refused_runs[tuple(argv)]
    assert result == {"rc": 2, "torch": False}, err
    assert err.startswith("meshserve: error:") and message in err and len(err.strip().splitlines()) == 1


def test_a_port_in_use_is_refused_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result, err = _run("serve", "llama-3.1-8b", "--load-format", "dummy", "--host", "127.0.0.1",
                           "--port", str(port))
    assert result == {"rc": 2, "torch": False}, err
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_a_port_in_use_is_refused_before_data_parallel_replicas_start():
    """The router back end used to start its replicas (loading the model in each) before binding its port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result, err = _run("serve", "llama-3.1-8b", "--load-format", "dummy", "--host", "127.0.0.1",
                           "--port", str(port), "-dp", "2", "--data-parallel-backend", "router")
    assert result == {"rc": 2, "torch": False}, err
    assert err.strip() == f"meshserve: error: cannot listen on 127.0.0.1:{port}: Address already in use"


_PARSE_ONLY = ("import json, sys; from meshserve.cli import build_parser; ns = build_parser(sys.argv[1:])"
               ".parse_args(sys.argv[1:]); print(json.dumps([ns.command, sorted(m for m in ("
               "'meshserve.bench.cli', 'meshserve.planner.cli', 'meshserve.router.cli', 'meshserve.simulator.cli', "
               "'meshserve.serve.cli', 'numpy', 'torch') if m in sys.modules)]))")


@pytest.mark.parametrize("argv,command,imported", [
    (["serve", "--port", "8001"], "serve", ["meshserve.serve.cli"]),
    (["--log-level", "INFO", "serve"], "serve", ["meshserve.serve.cli"]),
    (["--log-level=INFO", "router", "--backend", "http://a:1"], "router", ["meshserve.router.cli"]),
    (["run-batch", "-i", "in.jsonl"], "run-batch", ["meshserve.serve.cli"]),  # it takes serve's flags
])
def test_a_subcommand_s_line_imports_only_that_subcommand_s_module(argv, command, imported):
    """`meshserve serve` waits for its parser before the engine core starts: it builds serve's alone (the
    benchmarks', planner's and simulator's modules with numpy took ~0.5 s of a 2-core CPU)."""
    p = subprocess.run([sys.executable, "-c", _PARSE_ONLY, *argv], capture_output=True, text=True, timeout=60)
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [command, imported], p.stderr


def test_the_whole_parser_without_a_subcommand_of_another_module():
    from meshserve.cli import build_parser

    for argv in ([], ["generate", "Hi"], ["--help"]):
        sub = next(a for a in build_parser(argv)._actions if a.dest == "command")
        assert sorted(sub.choices) == ["bench", "generate", "plan", "router", "run-batch", "serve", "simulate"]


def test_an_unreadable_generation_config_named_by_the_flag_is_refused(tmp_path):
    """It used to be a warning and the model's defaults: the folder the user named was silently not used."""
    (tmp_path / "generation_config.json").write_text('{"temperature": ')
    result, err = _run("generate", "--generation-config", str(tmp_path), "Hi")
    assert result == {"rc": 2, "torch": False}, err
    assert err.startswith(f"meshserve: error: --generation-config {tmp_path}: cannot read") and "Expecting value" in err


def test_an_unknown_log_level_is_refused():
    """It used to fall back to WARNING silently."""
    p = subprocess.run([sys.executable, "-m", "meshserve.cli", "--log-level", "LOUD", "plan", "--list-gpus"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2 and "argument --log-level: invalid choice: 'LOUD'" in p.stderr
    p = subprocess.run([sys.executable, "-m", "meshserve.cli", "--log-level", "info", "plan", "--list-gpus"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr  # any case, as before


def test_a_tokenizer_folder_without_a_tokenizer_is_refused(tmp_path):
    """It used to load the model, then end in transformers' many-line ValueError traceback."""
    result, err = _run("serve", "--tokenizer", str(tmp_path))
    assert result == {"rc": 2, "torch": False}, err
    assert err.strip() == (f"meshserve: error: --tokenizer {tmp_path}: no tokenizer in the folder (none of "
                           "tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json)")


def test_files_of_the_wrong_kind_are_one_line(tmp_path):
    """Each was a traceback: a config.json holding a list (AttributeError), a binary --config or --chat-template
    file (UnicodeDecodeError)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("[1, 2]")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00bin")
    cases = {("generate", "--model", str(tmp_path / "model"), "Hi"):
             f"the model config {tmp_path / 'model' / 'config.json'} must be a JSON object of fields, got list",
             ("serve", str(tmp_path / "model")): "must be a JSON object of fields, got list",
             ("serve", "--config", str(binary)): f"--config: '{binary}' is not UTF-8 text (invalid start byte)",
             ("serve", "--chat-template", str(binary)):
             f"--chat-template: '{binary}' is not UTF-8 text (invalid start byte)"}
    runs = _run_each([list(argv) for argv in cases])
    for argv, message in cases.items():
        result, err = runs[argv]
        assert result == {"rc": 2, "torch": False}, err
        assert err.startswith("meshserve: error:") and message in err and len(err.strip().splitlines()) == 1, err
