"""`meshserve run-batch -i URL -o URL` (vLLM's run-batch): the input downloaded by GET before anything loads, the
output PUT once the batch ran; a bad URL, a refused GET or PUT, or a dead host is a one-line error, no traceback.
A local http.server stands in for the object store (no test depends on the network)."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from meshserve.cli import main
from meshserve.entrypoints import run_batch_urls

COMPLETION = {"model": "m", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
              "ignore_eos": True}
BATCH = "\n".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": COMPLETION})
                  for i in range(3)) + "\n"


class _Store(BaseHTTPRequestHandler):
    """GET /in.jsonl: the batch; PUT /out*: kept by path; /status/N answers N to either method."""

    def log_message(self, *args):  # quiet test output
        pass

    def _answer(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path.startswith("/status/"):
            self._answer(int(path.rsplit("/", 1)[1]), b"nope")
        elif path == "/in.jsonl":
            self._answer(200, BATCH.encode())
        elif path == "/empty.jsonl":
            self._answer(200, b"\n\n")
        elif path == "/latin1.jsonl":
            self._answer(200, "caf\xe9".encode("latin-1"))
        elif path == "/moved":
            self.send_response(302)
            self.send_header("location", "/in.jsonl")
            self.send_header("content-length", "0")
            self.end_headers()
        else:
            self._answer(404)

    def do_PUT(self):
        path = self.path.split("?")[0]
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.puts.append((path, self.headers.get("transfer-encoding"), body))
        self._answer(int(path.rsplit("/", 1)[1]) if path.startswith("/status/") else 201)


@pytest.fixture(scope="module")
def store():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Store)
    server.puts = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def puts(store):
    store.puts.clear()
    return store.puts


def _run(tiny_model_dir, *argv) -> int:
    return main(["run-batch", *argv, "--model", tiny_model_dir("llama"), "--served-model-name", "m",
                 "--engine-in-thread", "--max-model-len", "512"])


def test_input_by_get_output_by_put(tiny_model_dir, store, puts, tmp_path, capsys):
    rc = _run(tiny_model_dir, "-i", f"{store.url}/moved", "-o", f"{store.url}/out.jsonl?X-Amz-Signature=secret",
              "--output-tmp-dir", str(tmp_path / "spool"))
    err = capsys.readouterr().err
    assert rc == 0, err
    [(path, chunked, body)] = puts
    assert path == "/out.jsonl" and chunked is None  # Content-Length, as object stores want
    outputs = [json.loads(line) for line in body.decode().splitlines()]
    assert [o["custom_id"] for o in outputs] == ["r0", "r1", "r2"]
    assert all(o["response"]["status_code"] == 200 for o in outputs)
    assert os.listdir(tmp_path / "spool") == []  # the spool file is gone once uploaded
    assert "3 requests, 3 ok, 0 failed" in err and f"{store.url}/out.jsonl?..." in err and "secret" not in err


def test_url_input_to_a_local_file(tiny_model_dir, store, tmp_path):
    dst = tmp_path / "out.jsonl"
    assert _run(tiny_model_dir, "-i", f"{store.url}/in.jsonl", "-o", str(dst)) == 0
    assert [json.loads(line)["custom_id"] for line in dst.read_text().splitlines()] == ["r0", "r1", "r2"]


@pytest.mark.parametrize("case", ["get_404", "get_500", "unreachable", "ftp_input", "empty", "not_utf8",
                                  "s3_output", "no_host_output", "tmp_dir_is_file"])
def test_bad_urls_are_one_line_before_loading(case, store, tmp_path, capsys, monkeypatch):
    from meshserve.serve import api_server

    monkeypatch.setattr(api_server, "start_async_llm", None)  # nothing may load
    (tmp_path / "file").write_text("x")
    good_in, out = f"{store.url}/in.jsonl", str(tmp_path / "out.jsonl")
    argv, expected = {
        "get_404": (["-i", f"{store.url}/status/404?sig=secret", "-o", out], "HTTP 404 Not Found"),
        "get_500": (["-i", f"{store.url}/status/500", "-o", out], "HTTP 500 Internal Server Error"),
        "unreachable": (["-i", "http://127.0.0.1:1/in.jsonl", "-o", out], "cannot download it (ConnectError"),
        "ftp_input": (["-i", "ftp://host/in.jsonl", "-o", out], "ftp:// is not supported"),
        "empty": (["-i", f"{store.url}/empty.jsonl", "-o", out], "no requests in it"),
        "not_utf8": (["-i", f"{store.url}/latin1.jsonl", "-o", out], "not UTF-8 text"),
        "s3_output": (["-i", good_in, "-o", "s3://bucket/out.jsonl"], "s3:// is not supported"),
        "no_host_output": (["-i", good_in, "-o", "http:///out.jsonl"], "names no host"),
        "tmp_dir_is_file": (["-i", good_in, "-o", f"{store.url}/out.jsonl", "--output-tmp-dir",
                             str(tmp_path / "file" / "sub")], "is a file, not a folder"),
    }[case]
    rc = main(["run-batch", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("meshserve: error: ") and "\n" not in err, err
    assert expected in err and "secret" not in err, err
    if case.startswith("get_"):
        assert f"{store.url}/status/" in err  # the URL is named


@pytest.mark.parametrize("status, tries", [(403, 1), (500, run_batch_urls.UPLOAD_TRIES)])
def test_a_refused_upload_keeps_the_output_and_says_where(status, tries, tiny_model_dir, store, puts, tmp_path,
                                                          capsys, monkeypatch):
    monkeypatch.setattr(run_batch_urls, "UPLOAD_RETRY_DELAY_S", 0.0)
    rc = _run(tiny_model_dir, "-i", f"{store.url}/in.jsonl", "-o", f"{store.url}/status/{status}",
              "--output-tmp-dir", str(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("meshserve: error: -o ") and f"/status/{status}" in err, err
    assert f"HTTP {status}" in err and len(puts) == tries  # a 5xx is tried again, a 403 is not
    [kept] = os.listdir(tmp_path)
    assert str(tmp_path / kept) in err
    lines = (tmp_path / kept).read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == ["r0", "r1", "r2"] and puts[0][2].decode() == \
        "".join(line + "\n" for line in lines)


def test_an_unreachable_upload_is_one_line(tiny_model_dir, store, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_batch_urls, "UPLOAD_RETRY_DELAY_S", 0.0)
    rc = _run(tiny_model_dir, "-i", f"{store.url}/in.jsonl", "-o", "http://127.0.0.1:1/out.jsonl",
              "--output-tmp-dir", str(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "ConnectError" in err and f"after {run_batch_urls.UPLOAD_TRIES} tries" in err, err


def test_a_failed_load_leaves_no_spool(store, tmp_path, capsys, monkeypatch):
    from meshserve.errors import InvalidArgumentError
    from meshserve.serve import api_server

    def fail(*args, **kwargs):
        raise InvalidArgumentError("stopped before loading")

    monkeypatch.setattr(api_server, "start_async_llm", fail)
    rc = main(["run-batch", "-i", f"{store.url}/in.jsonl", "-o", f"{store.url}/out.jsonl", "--output-tmp-dir",
               str(tmp_path)])
    assert rc == 2 and "stopped before loading" in capsys.readouterr().err and os.listdir(tmp_path) == []
