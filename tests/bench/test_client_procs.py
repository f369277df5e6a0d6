"""`bench serve --client-procs N` against a stub streaming /v1/completions server (uvicorn in a thread)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from typing import Self

import pytest
import uvicorn

from meshserve.bench.client_procs import merge_results, run_load_in_procs, split_concurrency, split_requests
from meshserve.bench.serve_bench import (
    BenchRequest,
    RequestResult,
    format_point,
    lag_warning,
    run_load,
    summarize,
)
from meshserve.cli import main


def tokens_for(request_id: int) -> int:
    """The stub's output length for a request: differs by request, so misplaced records show."""
    return 1 + request_id % 3


class StubServer:
    """Streams `tokens_for(prompt[0])` one-character tokens 2 ms apart; logs every prompt it was sent. With
    refuse_every k: a prompt whose first id is k - 1 modulo k gets a 429 (OpenAI's error shape) after
    refuse_delay_s."""

    def __init__(self, refuse_every: int = 0, refuse_delay_s: float = 0.0) -> None:
        self.prompt_ids: list[int] = []
        self.refuse_every = refuse_every
        self.refuse_delay_s = refuse_delay_s
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, lifespan="off", log_level="error", interface="asgi3")
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    async def app(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/v1/models":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b'{"data": [{"id": "stub"}]}'})
            return
        prompt = json.loads(body)["prompt"]
        self.prompt_ids.append(prompt[0])
        if self.refuse_every and prompt[0] % self.refuse_every == self.refuse_every - 1:
            await asyncio.sleep(self.refuse_delay_s)
            error = {"error": {"message": "at capacity", "type": "rate_limit_error", "param": None,
                               "code": "slo_unattainable"}}
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": json.dumps(error).encode()})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        n = tokens_for(prompt[0])
        for _ in range(n):
            await asyncio.sleep(0.002)
            chunk = {"choices": [{"index": 0, "text": "x"}]}
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                    "more_body": True,
                }
            )
        usage = {"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": n}}
        await send(
            {"type": "http.response.body", "body": f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()}
        )

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture()
def stub():
    with StubServer() as server:
        yield server


def poisson_like(n: int, gap: float) -> list[BenchRequest]:
    """Requests whose first prompt id is their index, evenly `gap` apart."""
    return [BenchRequest([i, 7, 7], max_tokens=3, send_at=i * gap) for i in range(n)]


def test_split_and_merge_put_each_record_back_at_its_request():
    reqs = poisson_like(7, 0.0)
    shares = split_requests(reqs, 3)
    assert [[r.prompt[0] for r in s] for s in shares] == [[0, 3, 6], [1, 4], [2, 5]]
    records = [
        ([RequestResult(ok=True, ttft=0.1, output_tokens=r.prompt[0]) for r in s], 1.0 + k)
        for k, s in enumerate(shares)
    ]
    merged, duration = merge_results(records)
    assert [r.output_tokens for r in merged] == list(range(7)) and duration == 3.0
    assert split_concurrency(5, 2) == [3, 2] and split_concurrency(None, 2) == [None, None]


def test_two_procs_send_every_request_once_and_merge_in_order(stub):
    reqs = poisson_like(40, 0.005)
    results, duration = run_load_in_procs(2, stub.base_url, "stub", reqs, progress=False)
    assert sorted(stub.prompt_ids) == list(range(40))  # each request reached the server exactly once
    assert len(results) == 40 and all(r.ok for r in results)
    assert [r.output_tokens for r in results] == [tokens_for(i) for i in range(40)]
    # the run spans the arrivals (0.195 s) and the shared start: not the sum of two workers' runs
    assert 0.19 < duration < 5.0
    for r in results:
        assert r.connect is not None and r.headers is not None and r.ttft is not None
        assert 0 <= r.connect <= r.headers <= r.ttft and r.send_lag > -1e-3
    s = summarize(results, duration, 200.0)
    assert s["num_requests"] == s["completed"] == 40
    assert s["output_tokens"] == sum(tokens_for(i) for i in range(40))
    ttfts = sorted(r.ttft for r in results)
    assert s["ttft_p50"] == pytest.approx((ttfts[19] + ttfts[20]) / 2)
    assert s["headers_p99"] <= max(r.headers for r in results) and not math.isnan(s["connect_p50"])


def test_one_and_two_procs_agree_on_a_light_load(stub):
    # arrivals over ~0.9 s dominate the run; SLOs loose enough that a busy test host still meets them all
    reqs = poisson_like(30, 0.03)
    slos = {"ttft_slo": 10.0, "tpot_slo": 2.0}
    one = summarize(*asyncio.run(run_load(stub.base_url, "stub", reqs, progress=False)), 33.0, **slos)
    stub.prompt_ids.clear()
    two_results, two_duration = run_load_in_procs(2, stub.base_url, "stub", reqs, progress=False)
    two = summarize(two_results, two_duration, 33.0, **slos)
    assert sorted(stub.prompt_ids) == list(range(30))
    for s in (one, two):  # every request is good: goodput is 30 over the whole run
        assert s["num_requests"] == s["completed"] == 30
        assert s["goodput"] == pytest.approx(30 / s["duration_s"])
    # both runs keep the schedule: neither ends before the last arrival (a split that compressed or dropped the
    # send times would), and the two-process run, once its workers' late start (their send lag) is taken off,
    # is not much longer than the one-process run. Bounds in seconds, not ratios: a busy host adds
    # seconds to both runs, which a ratio on ~1 s runs cannot absorb
    span = reqs[-1].send_at
    assert one["duration_s"] >= span and two["duration_s"] >= span
    late_start = max(r.send_lag for r in two_results)
    assert two["duration_s"] - late_start < one["duration_s"] + 2.0


def test_closed_loop_over_procs_completes_every_request(stub):
    results, _ = run_load_in_procs(
        4, stub.base_url, "stub", poisson_like(9, 0.0), concurrency=3, progress=False
    )
    assert sorted(stub.prompt_ids) == list(range(9)) and all(r.ok for r in results)


def test_lag_warning_only_past_the_limit():
    assert lag_warning({"send_lag_p99": 0.01}, 1) is None
    line = lag_warning({"send_lag_p99": 4.4}, 2)
    assert "4400.0 ms" in line and "--client-procs 4" in line


def test_cli_client_procs_reports_every_request(stub, tmp_path, capsys):
    out = tmp_path / "w3.json"
    rc = main(
        [
            "bench",
            "serve",
            "--base-url",
            stub.base_url,
            "--qps",
            "200",
            "--num-prompts",
            "20",
            "--input-len",
            "4",
            "--client-procs",
            "2",
            "--no-progress",
            "--output-json",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["client_procs"] == 2 and report["model"] == "stub"
    point = report["points"][0]
    assert point["num_requests"] == point["completed"] == 20 and len(stub.prompt_ids) == 20
    assert "QPS 200: 20/20 ok" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_cli_rejects_bad_client_procs(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "serve", "--client-procs", value])
    assert exc.value.code == 2 and "--client-procs" in capsys.readouterr().err


def test_a_failing_worker_is_one_clear_error_not_a_hang(stub):
    from meshserve.errors import MeshserveError

    with pytest.raises(MeshserveError, match=r"client process [01] failed: TypeError"):
        run_load_in_procs(2, stub.base_url, "stub", poisson_like(4, 0.0), progress=False, no_such_option=1)


def test_refusals_are_counted_by_status_with_their_latency(tmp_path, capsys):
    # every 4th request is refused 50 ms after it arrives: their latency is that wait, not a stream's length
    with StubServer(refuse_every=4, refuse_delay_s=0.05) as server:
        out = tmp_path / "w3.json"
        rc = main(["bench", "serve", "--base-url", server.base_url, "--qps", "200", "--num-prompts", "20",
                   "--input-len", "4", "--client-procs", "2", "--no-progress", "--output-json", str(out)])
        refused = sum(1 for i in server.prompt_ids if i % 4 == 3)  # W3's first ids are random draws
    assert rc == 0  # some requests completed
    point = json.loads(out.read_text())["points"][0]
    assert refused >= 1 and point["failed"] == refused and point["completed"] == 20 - refused
    assert point["failed_by_status"] == {"429 slo_unattainable": refused}
    assert 0.05 <= point["reject_latency_p50"] <= point["reject_latency_p99"] < 2.0
    assert point["refusal_latency_by_kind"]["429 slo_unattainable"]["n"] == refused
    assert f"failed: {refused} 429 slo_unattainable; answered in 429 slo_unattainable p50" in capsys.readouterr().out


def test_summary_counts_failures_by_kind_and_times_refusals_only():
    ok = RequestResult(ok=True, ttft=0.1, e2e=0.2, output_tokens=2, status=200)
    refused = [RequestResult(ok=False, e2e=0.01 * (i + 1), status=429, error="HTTP 429") for i in range(4)]
    failed = [RequestResult(ok=False, e2e=0.3, status=503, error="HTTP 503"),
              RequestResult(ok=False, e2e=5.0, status=200, error="engine died"),  # an error event mid-stream
              RequestResult(ok=False, e2e=9.0, error="ConnectError: refused")]  # no response at all
    shed = RequestResult(ok=False, e2e=0.9, status=429, error="HTTP 429", code="slo_shed")
    s = summarize([ok, *refused, *failed, shed], 1.0, 10.0)
    assert s["failed"] == 8
    assert s["failed_by_status"] == {"429": 4, "429 slo_shed": 1, "503": 1, "no_response": 1, "stream": 1}
    # the refusals answered with an error status: 10, 20, 30, 40 ms and 300 ms; the shed one apart
    assert s["reject_latency_p50"] == pytest.approx(0.03) and s["reject_latency_mean"] == pytest.approx(0.08)
    assert s["shed_latency_p50"] == pytest.approx(0.9)
    # each kind timed on its own, and printed so: arrival refusals apart from shed ones and other statuses
    by_kind = s["refusal_latency_by_kind"]
    assert sorted(by_kind) == ["429", "429 slo_shed", "503"] and by_kind["429"]["n"] == 4
    assert by_kind["429"]["p50"] == pytest.approx(0.025) and by_kind["503"]["p99"] == pytest.approx(0.3)
    line = format_point({**s, "qps": 10.0})
    assert "answered in 429 p50 25.0 ms p99 39.7 ms, 429 slo_shed p50 900.0 ms p99 900.0 ms, 503 p50 300.0" in line
    assert summarize([ok], 1.0, 10.0)["failed_by_status"] == {}
