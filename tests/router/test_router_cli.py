"""`meshserve router` flags and `meshserve serve --data-parallel-size N` (replicas + router, end to end)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from meshserve.cli import build_parser, main
from meshserve.errors import InvalidArgumentError
from meshserve.router.cli import router_config_from
from meshserve.router.launcher import argv_from_namespace, partition_devices
from meshserve.router.upstream import httptools
from tests.router.conftest import free_port, wait_until

# deadlines that guard against a hang only: a replica's start-up (imports, load) has taken 30-60 s on a loaded
# 2-core machine, two of them at once longer (90 s ran out); the router then admits each after its good probes
START_S = 300


def test_router_flags_fill_the_config():
    ns = build_parser().parse_args(["router", "--backend", "http://a:1", "--backend", "http://b:2/",
                                    "--fallback", "http://f:3", "--policy", "prefix-affinity",
                                    "--health-interval", "0.5", "--max-attempts", "5", "--read-timeout", "9",
                                    "--fallback-queue-threshold", "64", "--target-queue-per-replica", "8"])
    config = router_config_from(ns)
    assert config.backends == ["http://a:1", "http://b:2/"] and config.fallbacks == ["http://f:3"]
    assert (config.policy, config.health_interval_s, config.max_attempts, config.read_timeout_s) == \
        ("prefix-affinity", 0.5, 5, 9.0)
    assert config.fallback_queue_threshold == 64 and config.target_queue_per_replica == 8
    with pytest.raises(InvalidArgumentError):
        router_config_from(build_parser().parse_args(["router"]))  # no backend at all


def test_router_command_without_backends_exits_2(capsys):
    assert main(["router"]) == 2
    assert "--backend" in capsys.readouterr().err


def test_data_parallel_replica_argv_reproduces_the_engine_flags():
    argv = ["serve", "/m", "--port", "9000", "-dp", "3", "-tp", "2", "--served-model-name", "a", "b",
            "--no-enable-prefix-caching", "--enforce-eager", "--max-queue-len", "7", "--api-key", "k"]
    ns = build_parser().parse_args(argv)
    ns.model = ns.model_tag  # as _cmd_serve does before handing over
    child = argv_from_namespace(ns.serve_parser, ns)
    assert "--port" not in child and "--data-parallel-size" not in child and "/m" not in child[:1]
    again = build_parser().parse_args(["serve", *child, "--port", "1"])
    for name in ("model", "tensor_parallel_size", "served_model_name", "enable_prefix_caching", "enforce_eager",
                 "max_queue_len", "api_key"):
        assert getattr(again, name) == getattr(ns, name), name
    assert again.data_parallel_size == 1


def test_data_parallel_replica_argv_carries_the_config_file_s_flags_not_the_file(tmp_path):
    """The replicas get the flags the file and the command line came to (the command line's over the file's),
    not --config again: a replica reading the file would let it override a flag given its default value."""
    from meshserve.serve.vllm_compat_args import apply_vllm_compat

    path = tmp_path / "serve.yaml"
    path.write_text("enable-prefix-caching: false\nmax-num-seqs: 4\n")
    argv = ["serve", "/m", "--config", str(path), "-dp", "2", "--data-parallel-backend", "router",
            "--enable-prefix-caching"]
    ns = build_parser(argv).parse_args(argv)
    ns.argv = argv  # as main() records it
    apply_vllm_compat(ns)
    child = argv_from_namespace(ns.serve_parser, ns)
    assert "--config" not in child
    again = build_parser().parse_args(["serve", *child])
    assert (again.enable_prefix_caching, again.max_num_seqs) == (True, 4)


def test_gpus_are_split_in_slices_of_tp_times_pp():
    assert partition_devices(2, 2, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert partition_devices(3, 1, ["4", "5", "6"]) == ["4", "5", "6"]
    assert partition_devices(2, 4, ["0", "1"]) == [None, None]  # too few: replicas share (CPU, tests)


def test_serve_rejects_bad_data_parallel_size(capsys):
    assert main(["serve", "--data-parallel-size", "0", "--device", "cpu"]) == 2
    assert "--data-parallel-size" in capsys.readouterr().err


def _children(ppid: int) -> dict[int, str]:
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent == ppid:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out[int(pid)] = f.read().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return out


def _replicas(ppid: int) -> dict[int, str]:
    """The replica children (`meshserve.cli serve`), not the router's workers."""
    return {pid: cmd for pid, cmd in _children(ppid).items() if "meshserve.cli" in cmd}


@pytest.mark.slow
def test_serve_data_parallel_starts_replicas_and_router_restarts_and_drains(tiny_model_dir):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshserve.cli", "serve", tiny_model_dir("llama"), "--data-parallel-size", "2",
         "--data-parallel-backend", "router",
         "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "256",
         "--device", "cpu", "--drain-timeout", "5", "--disable-access-log", "--uvicorn-log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))

    def replicas() -> list[dict]:
        try:
            return httpx.get(base + "/router/replicas", timeout=5).json()["replicas"]
        except httpx.HTTPError:
            return []

    try:
        assert wait_until(lambda: len(replicas()) == 2 and all(r["healthy"] for r in replicas()), START_S, 0.2), \
            proc.stdout.read() if proc.poll() is not None else f"replicas never became healthy: {replicas()}"

        # each of the router's worker processes probes the replicas on its own, so the one that answered
        # /router/replicas may admit them before the one that takes the next request: serving is the check
        def served_by() -> str | None:
            try:
                resp = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3},
                                  timeout=30)
            except httpx.HTTPError:  # a router too busy to answer in time: not yet
                return None
            return resp.headers.get("x-meshserve-replica") if resp.status_code == 200 else None

        served: set = set()
        assert wait_until(lambda: served.add(served_by()) or {"primary-0", "primary-1"} <= served, START_S, 0.1), \
            served

        children = _replicas(proc.pid)
        assert len(children) == 2 and all("--data-parallel-size" not in c for c in children.values())
        listing: list[dict] = []
        assert wait_until(lambda: listing.extend(replicas()) or bool(listing), 30, 0.2)
        victim_name, victim_port = listing[0]["name"], listing[0]["url"].rsplit(":", 1)[1]
        victim = next(pid for pid, cmd in children.items() if f"--port {victim_port}" in cmd)
        os.kill(victim, signal.SIGKILL)
        # an empty answer is a router too busy to say (on a loaded machine): not yet
        assert wait_until(lambda: (r := replicas()) and not r[0]["healthy"], 30, 0.1)
        assert wait_until(lambda: any(f"--port {victim_port}" in cmd and pid != victim  # restarted on its port
                                      for pid, cmd in _replicas(proc.pid).items()), START_S, 0.2)
        assert wait_until(lambda: served_by() == victim_name, START_S, 0.1)  # re-admitted (as above)
        assert victim not in _children(proc.pid)

        urls = [r["url"] for r in listing]  # a restarted replica keeps its port
        assert len(_replicas(proc.pid)) == 2
        children = _children(proc.pid)  # the replicas and the router's worker processes
        proc.send_signal(signal.SIGTERM)  # drains the router, then the replicas
        assert proc.wait(120) == 0
        for url in [base, *urls]:  # nothing is left listening
            with pytest.raises(httpx.HTTPError):
                httpx.get(url + "/health", timeout=1)
        for child in children:  # and no orphan (multiprocessing's resource tracker exits once it reads EOF)
            assert wait_until(lambda child=child: not os.path.exists(f"/proc/{child}"), 10), children[child]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# the router's upstream paths: FastUpstream where httptools is installed, the plain httpx one always
UPSTREAMS = ["fast", "httpx"] if httptools is not None else ["httpx"]
# `meshserve router` with the plain upstream forced (make_upstream picks FastUpstream when httptools is here)
_PLAIN_ROUTER = ("import sys, meshserve.router.app as app, meshserve.router.upstream as up; "
                 "app.make_upstream = lambda client, expiry: up.HttpxUpstream(client); "
                 "from meshserve.cli import main; sys.exit(main(sys.argv[1:]))")


def _start_router(upstream: str, args: list[str]) -> tuple[subprocess.Popen, str]:
    """A one-worker router on a free port with `args` (backends, drain timeout), over the given upstream."""
    port = free_port()
    launch = [sys.executable, "-m", "meshserve.cli"] if upstream == "fast" else [sys.executable, "-c", _PLAIN_ROUTER]
    proc = subprocess.Popen([*launch, "router", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--health-interval", "0.2", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(base + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_until(ready, START_S):
        proc.kill()
        proc.wait()
        pytest.fail(f"the router ({upstream}) did not get ready")
    return proc, base


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_drain_timeout_ends_requests_in_flight_in_band(fake_replicas, upstream):
    """Requests still in flight when the router's --drain-timeout passes end in-band: a relayed stream with
    its error event (server_draining) and [DONE], a request still waiting for its replica's answer with a 503
    and Retry-After. Both used to run on for uvicorn's 2 s of grace and then lose their connection (the
    stream mid-body, the other with a bare 500); over the plain upstream too."""
    script, replica = fake_replicas("slow", num_events=400, event_delay_s=0.05, answer_delay_s=20)  # 20 s each
    proc, base = _start_router(upstream, ["--backend", replica.base_url, "--drain-timeout", "0.3"])
    try:
        answers: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: answers.append(httpx.post(
            base + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=30)))
        events = []
        stream = {"model": "tiny", "prompt": "x", "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=stream, timeout=30) as resp:
            lines = resp.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    break
            waiting.start()
            assert wait_until(lambda: _in_flight(base) == 2, 10)
            proc.send_signal(signal.SIGTERM)
            # the rest (before the fix: raised when the connection was cut)
            events += [line[6:] for line in lines if line.startswith("data: ")]
        waiting.join(30)
        assert proc.wait(30) == 0
        assert events[-1] == "[DONE]" and len(events) < 400
        assert json.loads(events[-2])["error"]["code"] == "server_draining"
        assert all("choices" in json.loads(e) for e in events[:-2])  # whole events before it, none torn
        assert answers[0].status_code == 503 and "retry-after" in answers[0].headers
        assert answers[0].json()["error"]["code"] == "server_draining"
        assert len(script.requests) == 2  # neither was retried
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "concurrent"])
@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_drain_timeout_ends_disaggregated_legs_in_band(fake_replicas, upstream, concurrent):
    """Disaggregation's legs end in-band at the drain timeout too. Sequential: requests whose prefill leg still
    waits for the prefill instance get a 503 + Retry-After (server_draining) and no decode leg; they used to
    wait on until uvicorn's cut. Concurrent: the decode legs end as proxied requests do (a 503, or the stream's
    error event and [DONE]) while their prefill legs, aborted too, wait no longer."""
    prefill_script, prefill = fake_replicas("prefill", answer_delay_s=20)  # a 20 s prefill
    decode_script, decode = fake_replicas("decode", num_events=400, event_delay_s=0.05, answer_delay_s=20)
    proc, base = _start_router(upstream, ["--backend", decode.base_url, "--prefill", prefill.base_url,
                                          "--drain-timeout", "0.3", *(["--disagg-concurrent"] * concurrent)])
    try:
        answers: dict[bool, tuple[int, str, httpx.Headers]] = {}  # stream? -> status, body, headers
        body = {"model": "tiny", "prompt": "x", "max_tokens": 8}
        first_event = threading.Event()  # the stream's first event reached the client

        def ask(stream: bool) -> None:
            with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": stream}, timeout=30) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    if line.startswith("data: "):
                        first_event.set()
                answers[stream] = (r.status_code, "\n".join(lines), r.headers)

        waiting = [threading.Thread(target=ask, args=(stream,)) for stream in (False, True)]
        for thread in waiting:
            thread.start()
        assert wait_until(lambda: len(prefill_script.requests) == 2 and
                          len(decode_script.requests) == (2 if concurrent else 0), 10)
        if concurrent:  # SIGTERM once the stream is being relayed
            assert first_event.wait(10)
        proc.send_signal(signal.SIGTERM)
        for thread in waiting:
            thread.join(30)
        assert proc.wait(30) == 0
        (status, text, headers), (stream_status, stream_text, _) = answers[False], answers[True]
        assert status == 503 and "retry-after" in headers
        assert json.loads(text)["error"]["code"] == "server_draining"
        if concurrent:
            events = [line[6:] for line in stream_text.splitlines() if line.startswith("data: ")]
            assert stream_status == 200 and events[-1] == "[DONE]" and len(events) < 400
            assert json.loads(events[-2])["error"]["code"] == "server_draining"
            assert all("choices" in json.loads(e) for e in events[:-2])
        else:
            assert stream_status == 503 and json.loads(stream_text)["error"]["code"] == "server_draining"
            assert decode_script.requests == []  # the decode legs never started
        assert len(prefill_script.requests) == 2  # one prefill leg each
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _in_flight(base: str) -> int:
    return httpx.get(base + "/router/replicas", timeout=5).json()["in_flight"]
