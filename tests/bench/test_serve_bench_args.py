"""`meshserve bench serve`'s bad input: one `meshserve: error:` line and exit 2, before (or instead of) any
request; no httpx traceback when no server listens."""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest

from meshserve.cli import main


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("meshserve: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_no_server_listening_is_one_line_naming_the_url(capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["bench", "serve", "--base-url", url, "--num-prompts", "2", "--no-progress"]) == 2
    err = _one_error_line(capsys)
    assert f"cannot reach the server at {url} (connection refused)" in err and "--base-url" in err


def test_no_server_listening_is_one_line_with_a_model_named_too(capsys):
    """With --model the server was not asked anything first: every request of every point failed instead."""
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["bench", "serve", "--base-url", url, "--model", "m", "--num-prompts", "2", "--no-progress"]) == 2
    assert f"cannot reach the server at {url} (connection refused)" in _one_error_line(capsys)


@pytest.mark.parametrize("flags,message", [
    (["--base-url", "notaurl"], "--base-url 'notaurl': expected http(s)://HOST[:PORT]"),
    (["--base-url", "http://"], "--base-url 'http://'"),
    (["--qps", "0"], "--qps '0': each rate must be > 0"),
    (["--qps", "4,nan"], "--qps '4,nan'"),
    (["--qps", "fast"], "--qps 'fast': expected comma-separated numbers"),
    (["--concurrency", "2,0"], "--concurrency '2,0': each value must be a whole number >= 1"),
    (["--num-prompts", "1.5"], "--num-prompts '1.5'"),
    (["--qps", "1,2", "--num-prompts", "1,2,3"], "--num-prompts gives 3 counts for 2 points"),
    (["--dataset", "file"], "--dataset file needs --dataset-path"),
    (["--prompts-file", "/nonexistent/prompts.jsonl"], "--prompts-file /nonexistent/prompts.jsonl: file not found"),
    (["--response-format-json-schema", "/nonexistent.json"], "--response-format-json-schema /nonexistent.json"),
    (["--input-len", "0"], "--input-len must be >= 1, got 0"),
    (["--max-token-id", "2"], "--max-token-id must be >= 3"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--tpot-slo", "0"], "--tpot-slo must be > 0"),
    (["--endpoint", "chat"], "--endpoint chat needs text prompts"),
    (["--output-json", "/nonexistent/dir/out.json"], "--output-json /nonexistent/dir/out.json: the folder"),
    (["--plot", "/nonexistent/dir/p.svg"], "--plot /nonexistent/dir/p.svg: the folder"),
])
def test_bad_flags_fail_before_the_server_is_asked(flags, message, capsys):
    # the base URL is a closed port: a flag checked too late would show as "cannot reach the server" instead
    argv = ["bench", "serve", "--base-url", f"http://127.0.0.1:{_closed_port()}", "--no-progress", *flags]
    if "--base-url" in flags:
        argv = ["bench", "serve", "--no-progress", *flags]
    assert main(argv) == 2
    assert message in _one_error_line(capsys)


def test_a_malformed_prompts_file_names_its_line(tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"text": "no prompt key"}\n')
    assert main(["bench", "serve", "--base-url", f"http://127.0.0.1:{_closed_port()}", "--no-progress",
                 "--dataset", "file", "--dataset-path", str(path)]) == 2
    assert f"{path}:3: not a prompt row (no 'prompt' key)" in _one_error_line(capsys)


@pytest.mark.parametrize("name", ["prompts.jsonl", "prompts.txt"])
def test_a_prompts_file_that_is_not_text_is_one_line(name, tmp_path, capsys):
    """A binary file was a UnicodeDecodeError traceback."""
    path = tmp_path / name
    path.write_bytes(b"\xff\xfe\x00bin")
    assert main(["bench", "serve", "--base-url", f"http://127.0.0.1:{_closed_port()}", "--no-progress",
                 "--prompts-file", str(path)]) == 2
    assert f"{path}: not UTF-8 text (invalid start byte)" in _one_error_line(capsys)


class _Answer(http.server.BaseHTTPRequestHandler):
    status, body = 200, b"{}"

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,body,message", [
    (401, b'{"error": "no key"}', "refused GET /v1/models (401): pass its key with --api-key"),
    (404, b"not found", "answered 404 to GET /v1/models; pass the model's name with --model"),
    (200, json.dumps({"data": []}).encode(), "lists no model at /v1/models"),
])
def test_a_server_that_cannot_name_its_model_is_one_line(status, body, message, capsys):
    handler = type("Handler", (_Answer,), {"status": status, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["bench", "serve", "--base-url", url, "--num-prompts", "1", "--no-progress"]) == 2
    finally:
        server.shutdown()
        server.server_close()
    assert message in _one_error_line(capsys)
