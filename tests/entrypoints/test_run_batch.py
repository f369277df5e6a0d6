"""`meshserve run-batch`: OpenAI batch lines answered as the server answers them, bad lines on their own."""

from __future__ import annotations

import asyncio
import io
import json
import sys

import httpx
import pytest

from meshserve.cli import main
from meshserve.entrypoints.batch_lines import parse_batch_lines
from meshserve.entrypoints.run_batch import run_batch
from meshserve.serve.config import ServeConfig
from meshserve.serve.openai_api import build_app
from tests.serve.conftest import make_engine, start_server

MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 6,
        "temperature": 0, "ignore_eos": True}
COMPLETION = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
              "ignore_eos": True}
TOKEN_IDS = {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
RESPONSE = {"model": MODEL, "input": "Hello world", "max_output_tokens": 6, "temperature": 0}


def _line(custom_id, url, body, method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    allm = make_engine(tiny_model_dir("llama"))
    yield allm
    allm.shutdown()


@pytest.fixture(scope="module")
def app(engine):
    return build_app(engine, ServeConfig(served_model_names=[MODEL]))


def _run(app, lines: list[str], max_concurrent: int = 8) -> tuple[list[dict], object]:
    out = io.StringIO()
    progress = asyncio.run(run_batch(app, parse_batch_lines(lines), out, max_concurrent))
    return [json.loads(line) for line in out.getvalue().splitlines()], progress


def _comparable(body):
    """body less what differs between two answers of the same request: ids, times, prefix-cache hits."""
    if isinstance(body, list):
        return [_comparable(v) for v in body]
    if isinstance(body, dict):
        return {k: _comparable(v) for k, v in body.items()
                if k not in ("id", "created", "created_at") and not k.endswith("_tokens_details")}
    return body


def test_answers_equal_the_servers_in_input_order(engine, app):
    lines = [_line("chat-1", "/v1/chat/completions", CHAT), _line("cmpl-1", "/v1/completions", COMPLETION),
             _line("ids-1", "/v1/completions", TOKEN_IDS), _line("resp-1", "/v1/responses", RESPONSE),
             _line("chat-2", "/v1/chat/completions", {**CHAT, "max_tokens": 3})]
    outputs, progress = _run(app, lines)
    assert [o["custom_id"] for o in outputs] == ["chat-1", "cmpl-1", "ids-1", "resp-1", "chat-2"]
    assert (progress.num_requests, progress.num_ok, progress.num_failed) == (5, 5, 0)
    for o in outputs:
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"].startswith("req_")
    server = start_server(engine, ServeConfig(served_model_names=[MODEL]))
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            for line, o in zip(lines, outputs):
                item = json.loads(line)
                served = http.post(item["url"], json=item["body"])
                assert served.status_code == 200
                assert _comparable(o["response"]["body"]) == _comparable(served.json()), item["custom_id"]
    finally:
        server.stop()


def test_bad_lines_and_refusals_are_per_line(app):
    lines = ["{not json", json.dumps([1, 2]), json.dumps({"method": "POST", "url": "/v1/completions",
                                                         "body": COMPLETION}),
             _line("ok-1", "/v1/completions", COMPLETION),
             _line("ok-1", "/v1/completions", COMPLETION),  # duplicate: refused, the first runs
             _line("get", "/v1/completions", COMPLETION, method="GET"),
             _line("embed", "/v1/embeddings", {"model": MODEL, "input": "hi"}),
             json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/completions"}),
             _line("stream", "/v1/chat/completions", {**CHAT, "stream": True}),
             "",  # blank: no request, no output line
             _line("no-model", "/v1/completions", {**COMPLETION, "model": "nope"}),
             _line("bad-field", "/v1/chat/completions", {**CHAT, "max_tokens": -1}),
             _line("ok-2", "/v1/chat/completions", CHAT)]
    outputs, progress = _run(app, lines)
    assert len(outputs) == 12 and (progress.num_ok, progress.num_failed) == (2, 10)
    errors = [(o["custom_id"], o["error"]["code"]) for o in outputs if o["response"] is None]
    assert errors == [(None, "invalid_json_line"), (None, "invalid_json_line"), (None, "missing_custom_id"),
                      ("ok-1", "duplicate_custom_id"), ("get", "invalid_method"), ("embed", "invalid_url"),
                      ("nobody", "missing_body"), ("stream", "stream_not_supported")]
    assert all(o["error"]["message"] for o in outputs if o["response"] is None)
    refused = {o["custom_id"]: o["response"] for o in outputs if o["response"] and o["custom_id"] not in
               ("ok-1", "ok-2")}
    assert refused["no-model"]["status_code"] == 404 and refused["no-model"]["body"]["error"]["message"]
    assert refused["bad-field"]["status_code"] == 400
    assert refused["bad-field"]["body"]["error"]["type"] == "invalid_request_error"
    answered = [o for o in outputs if o["custom_id"] in ("ok-1", "ok-2") and o["response"]]
    assert [o["response"]["status_code"] for o in answered] == [200, 200]


def test_requests_in_flight_are_bounded(app):
    in_flight = {"now": 0, "most": 0}

    async def counting(scope, receive, send):
        in_flight["now"] += 1
        in_flight["most"] = max(in_flight["most"], in_flight["now"])
        try:
            await app(scope, receive, send)
        finally:
            in_flight["now"] -= 1

    lines = [_line(f"r{i}", "/v1/completions", {**COMPLETION, "max_tokens": 2 + i % 3}) for i in range(7)]
    outputs, progress = _run(counting, lines, max_concurrent=2)
    assert [o["custom_id"] for o in outputs] == [f"r{i}" for i in range(7)] and progress.num_ok == 7
    assert in_flight["most"] == 2


def test_cli_files_in_order_with_summary(tiny_model_dir, tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join([_line("a", "/v1/chat/completions", {**CHAT, "model": "m"}),
                              _line("b", "/v1/embeddings", {"input": "x"}),
                              _line("c", "/v1/completions", {**COMPLETION, "model": "m"})]) + "\n")
    rc = main(["run-batch", "-i", str(src), "-o", str(dst), "--model", tiny_model_dir("llama"),
               "--served-model-name", "m", "--max-model-len", "512"])
    assert rc == 0
    outputs = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["custom_id"] for o in outputs] == ["a", "b", "c"]
    assert [o["response"] and o["response"]["status_code"] for o in outputs] == [200, None, 200]
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("meshserve run-batch: 3 requests, 2 ok, 1 failed, ") and str(dst) in err[-1]


def test_cli_stdin_to_stdout(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(_line("only", "/v1/completions", COMPLETION) + "\n"))
    rc = main(["run-batch", "-i", "-", "-o", "-", "--model", tiny_model_dir("llama"), "--served-model-name",
               MODEL, "--engine-in-thread", "--max-model-len", "512"])
    captured = capsys.readouterr()
    assert rc == 0
    [output] = [json.loads(line) for line in captured.out.splitlines()]
    assert output["custom_id"] == "only" and output["response"]["status_code"] == 200
    assert "1 request, 1 ok, 0 failed" in captured.err and "standard output" in captured.err


@pytest.mark.parametrize("case", ["no_input_flag", "missing_input", "no_requests", "no_output_flag",
                                  "output_folder_missing", "output_is_folder", "output_is_input", "concurrency"])
def test_cli_errors_are_one_line_before_loading(case, tmp_path, capsys, monkeypatch):
    from meshserve.serve import api_server

    monkeypatch.setattr(api_server, "start_async_llm", None)  # nothing may load
    good = tmp_path / "in.jsonl"
    good.write_text(_line("a", "/v1/completions", COMPLETION) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    out = str(tmp_path / "out.jsonl")
    argv = {"no_input_flag": ["-o", out], "missing_input": ["-i", str(tmp_path / "nope.jsonl"), "-o", out],
            "no_requests": ["-i", str(empty), "-o", out], "no_output_flag": ["-i", str(good)],
            "output_folder_missing": ["-i", str(good), "-o", str(tmp_path / "no" / "out.jsonl")],
            "output_is_folder": ["-i", str(good), "-o", str(tmp_path)],
            "output_is_input": ["-i", str(good), "-o", str(tmp_path / "." / "in.jsonl")],
            "concurrency": ["-i", str(good), "-o", out, "--max-concurrent-requests", "0"]}[case]
    rc = main(["run-batch", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("meshserve: error: ") and "\n" not in err
    assert good.read_text().startswith('{"custom_id": "a"')  # the input is never touched


def test_cli_config_file_sets_serve_flags(tmp_path, monkeypatch, capsys):
    from meshserve.errors import InvalidArgumentError
    from meshserve.serve import api_server

    seen = {}

    def start_nothing(engine_args, *args, **kwargs):
        seen["max_num_seqs"] = engine_args.max_num_seqs
        raise InvalidArgumentError("stopped before loading")

    monkeypatch.setattr(api_server, "start_async_llm", start_nothing)
    (tmp_path / "in.jsonl").write_text(_line("a", "/v1/completions", COMPLETION) + "\n")
    (tmp_path / "c.yaml").write_text("max-num-seqs: 3\nmax-concurrent-requests: 2\n")
    rc = main(["run-batch", "--config", str(tmp_path / "c.yaml"), "-i", str(tmp_path / "in.jsonl"),
               "-o", str(tmp_path / "out.jsonl")])
    assert rc == 2 and seen == {"max_num_seqs": 3} and "stopped before loading" in capsys.readouterr().err
