"""`meshserve bench serve` (W3): load an OpenAI-compatible endpoint, ours or another engine's.

Requests stream from /v1/completions (or /v1/chat/completions) with Poisson arrivals at each given QPS, or
at a fixed concurrency. Prompts are W3's synthetic token ids (`random.seed(1000 + QPS)`, each point its own
draws so the prefix cache cannot serve one point from another; n = max(200, 30 x QPS) prompts of 512 ids in
[3, 10000], then n gaps `random.expovariate(QPS)`), or read from a file. Per load
point: TTFT, inter-token latency, time per output token and end-to-end latency (mean, p50, p90, p99),
throughput, and goodput (requests per second of the whole run that met the TTFT and TPOT SLOs). Where
lateness comes from is measured apart: send lag (the client sending late), connect (until the request's
headers went out) and headers (until the response's came back: the server's accept queue and HTTP layer).
`--client-procs N` sends from N processes (client_procs.py); `--response-format-json-schema` sends a JSON
schema with every request (serve_structured.py). Results go to stdout, JSON, a BENCHMARKS.md row and a
latency-vs-load plot (PNG with matplotlib, else SVG).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshserve.bench.serve_bench_args import check_serve_bench_args, loads_and_counts, unreachable
from meshserve.errors import InvalidArgumentError, MeshserveError

W3_QPS = (4.0, 8.0, 16.0, 32.0, 64.0, 96.0)
SEND_LAG_WARN_S = 0.05  # send lag p99 past which the load point measures the client more than the server


@dataclass
class BenchRequest:
    prompt: str | list[int]
    max_tokens: int
    send_at: float = 0.0  # seconds after the start of the load point


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None
    code: str | None = None  # an error answer's OpenAI error code (slo_unattainable, slo_shed, ...)
    send_lag: float = 0.0  # how late the request left against its arrival time (the client keeping up)
    # after the request left: its headers going out (connection pool wait + TCP connect) and the response's
    # headers coming back (server accept queue + HTTP layer), so a slow front door is not hidden in TTFT
    connect: float | None = None
    headers: float | None = None
    status: int | None = None  # the response's HTTP status (None: no response came)
    text: str = ""  # the streamed content of the first choice (structured runs parse it)
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)  # the first choice's ids, when asked (return_token_ids)
    cached_tokens: int | None = None  # prompt tokens the server's prefix cache served (usage, where reported)

    @property
    def tpot(self) -> float:
        """Time per output token after the first (0 for one-token outputs)."""
        if self.ttft is None or self.output_tokens <= 1:
            return 0.0
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# -- workloads --------------------------------------------------------------------------------------
def w3_requests(qps: float, num_prompts: int | None = None, input_len: int = 512, output_len: int = 128,
                seed: int = 3, max_token_id: int = 10000) -> list[BenchRequest]:
    """W3 exactly: seed, then all prompts, then all Poisson gaps (none when qps is inf)."""
    random.seed(seed)
    n = _w3_count(qps, num_prompts)
    prompts = [[random.randint(3, max_token_id) for _ in range(input_len)] for _ in range(n)]
    return _with_arrivals([BenchRequest(p, output_len) for p in prompts], qps)


def w3_arrivals(qps: float, num_prompts: int | None = None, input_len: int = 512, seed: int = 3,
                max_token_id: int = 10000) -> list[float]:
    """w3_requests' send times without its prompts: the generator skips their ids in bulk (bench/rng_skip.py),
    then draws the same gaps (the simulator's W3 trace; ~1.5 M randint calls fewer at 96 QPS)."""
    from meshserve.bench.rng_skip import skip_randints

    random.seed(seed)
    n = _w3_count(qps, num_prompts)
    skip_randints(n * input_len, 3, max_token_id)
    return [r.send_at for r in _with_arrivals([BenchRequest([], 0) for _ in range(n)], qps)]


def _w3_count(qps: float, num_prompts: int | None) -> int:
    return num_prompts if num_prompts is not None else max(200, int(30 * qps) if math.isfinite(qps) else 200)


def w4_requests() -> tuple[BenchRequest, list[BenchRequest]]:
    """W4: a 2,048-id prefix (`random.seed(1)`), a warm-up request of it, then 64 requests of prefix + 32 own
    ids, all sent at once with max_tokens 1 (their TTFT shows what prefix caching saves)."""
    random.seed(1)
    prefix = [random.randint(0, 10000) for _ in range(2048)]
    reqs = [BenchRequest(prefix + [random.randint(0, 10000) for _ in range(32)], 1) for _ in range(64)]
    return BenchRequest(prefix + [7] * 32, 1), reqs


def file_requests(path: str, qps: float, num_prompts: int | None, output_len: int,
                  seed: int = 3) -> list[BenchRequest]:
    """Prompts from a .jsonl file ({"prompt": str | [ids], "max_tokens"?: int}) or one text per line."""
    random.seed(seed)
    reqs = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if path.endswith(".jsonl"):
                    reqs.append(_jsonl_request(path, number, line, output_len))
                else:
                    reqs.append(BenchRequest(line, output_len))
    except UnicodeDecodeError as e:  # a binary file was a traceback
        raise InvalidArgumentError(f"{path}: not UTF-8 text ({e.reason})", param="dataset_path") from None
    if not reqs:
        raise InvalidArgumentError(f"no prompts in {path}", param="dataset_path")
    if num_prompts is not None:  # cycle the file to the asked count
        reqs = [BenchRequest(reqs[i % len(reqs)].prompt, reqs[i % len(reqs)].max_tokens) for i in range(num_prompts)]
    return _with_arrivals(reqs, qps)


def _jsonl_request(path: str, number: int, line: str, output_len: int) -> BenchRequest:
    """One .jsonl line's request; a malformed line is one error naming the file and the line."""
    try:
        row = json.loads(line)
        prompt = row["prompt"]
        max_tokens = int(row.get("max_tokens", output_len))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        why = "no 'prompt' key" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise InvalidArgumentError(f"{path}:{number}: not a prompt row ({why}); expected "
                                   '{"prompt": TEXT or [IDS], "max_tokens": N}', param="dataset_path") from None
    if not isinstance(prompt, (str, list)) or not prompt:
        raise InvalidArgumentError(f"{path}:{number}: 'prompt' must be a non-empty string or list of token ids",
                                   param="dataset_path")
    return BenchRequest(prompt, max_tokens)


def _with_arrivals(reqs: list[BenchRequest], qps: float) -> list[BenchRequest]:
    t = 0.0
    for r in reqs:
        if math.isfinite(qps):
            t += random.expovariate(qps)
        r.send_at = t
    return reqs


# -- one request ------------------------------------------------------------------------------------
async def send_request(client, url: str, body: dict[str, Any], chat: bool) -> RequestResult:
    """Stream one request; TTFT is the first chunk with content, ITLs the gaps between content chunks."""
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    chunks_with_content = 0
    saw_text = False

    async def trace(event: str, info: dict) -> None:  # httpcore's per-connection events
        if result.connect is None and event.endswith("send_request_headers.started"):
            result.connect = time.perf_counter() - start

    try:
        async with client.stream("POST", url, json=body, extensions={"trace": trace}) as resp:
            result.headers = time.perf_counter() - start
            result.status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.e2e = time.perf_counter() - start  # the refusal's latency: send to its whole answer
                result.error = f"HTTP {resp.status_code}: {text[:200]}"
                result.code = _error_code(text)
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.e2e = time.perf_counter() - start
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    return result
                now = time.perf_counter()
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens", 0)
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    if "cached_tokens" in details:
                        result.cached_tokens = details["cached_tokens"]
                choices = chunk.get("choices") or []
                if chat:
                    has_content = any(c.get("delta", {}).get("content") for c in choices)
                else:
                    texts = [c.get("text") for c in choices]
                    saw_text = saw_text or any(texts)
                    # a model without a tokenizer streams empty text: then every choice chunk is a token
                    has_content = any(texts) or (bool(choices) and not saw_text)
                    # return_token_ids: a chunk of ids is a token even while its text is held back
                    has_content = has_content or any(c.get("token_ids") for c in choices)
                for c in choices[:1]:
                    result.text += ((c.get("delta") or {}).get("content") if chat else c.get("text")) or ""
                    result.token_ids += c.get("token_ids") or []
                    result.finish_reason = c.get("finish_reason") or result.finish_reason
                if not has_content:
                    continue
                chunks_with_content += 1
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
    except Exception as e:  # noqa: BLE001 - a failed request is a data point, not a crash
        result.e2e = time.perf_counter() - start
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - start
    if not result.output_tokens:  # a server that sends no usage: count content chunks
        result.output_tokens = chunks_with_content
    result.ok = result.ttft is not None
    if not result.ok and result.error is None:
        result.error = "no tokens received"
    return result


def request_body(req: BenchRequest, model: str, chat: bool, temperature: float, ignore_eos: bool,
                 extra: dict[str, Any] | None = None) -> dict:
    """One streamed request; `extra` fields (e.g. response_format) are added as they are."""
    body: dict[str, Any] = {"model": model, "max_tokens": req.max_tokens, "temperature": temperature,
                            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM / SGLang / meshserve extension; OpenAI ignores it
    if chat:
        if not isinstance(req.prompt, str):
            raise ValueError("the chat endpoint needs text prompts (use --dataset file)")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


# -- one load point ---------------------------------------------------------------------------------
async def run_load(base_url: str, model: str, reqs: list[BenchRequest], *, chat: bool = False,
                   concurrency: int | None = None, temperature: float = 0.0, ignore_eos: bool = True,
                   api_key: str | None = None, progress: bool = True, timeout: float = 600.0,
                   start_at: float | None = None, on_done: Callable[[], None] | None = None,
                   extra_body: dict[str, Any] | None = None) -> tuple[list[RequestResult], float]:
    """Send every request at its arrival time (or as slots free up); returns results and the wall time.

    `start_at` (a `time.perf_counter()` value, default now) is the run's start, shared by client processes;
    `on_done` is called as each request finishes (their progress bar); `extra_body` goes into every body."""
    import httpx

    url = base_url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(reqs), desc="requests", dynamic_ncols=True, file=sys.stderr)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        start = time.perf_counter() if start_at is None else start_at

        def body(req: BenchRequest) -> dict:
            return request_body(req, model, chat, temperature, ignore_eos, extra_body)

        async def one(req: BenchRequest) -> RequestResult:
            if sem is None:
                await asyncio.sleep(max(0.0, start + req.send_at - time.perf_counter()))
                lag = time.perf_counter() - (start + req.send_at)
                res = await send_request(client, url, body(req), chat)
                res.send_lag = lag
            else:
                async with sem:
                    res = await send_request(client, url, body(req), chat)
            if bar is not None:
                bar.update(1)
            if on_done is not None:
                on_done()
            return res

        results = await asyncio.gather(*(one(r) for r in reqs))
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return list(results), duration


def _stats(values: list[float], prefix: str) -> dict[str, float]:
    if not values:
        return {f"{prefix}_{k}": float("nan") for k in ("mean", "p50", "p90", "p99")}
    a = np.asarray(values, dtype=float)
    return {f"{prefix}_mean": float(a.mean()), f"{prefix}_p50": float(np.percentile(a, 50)),
            f"{prefix}_p90": float(np.percentile(a, 90)), f"{prefix}_p99": float(np.percentile(a, 99))}


def _error_code(body: str) -> str | None:
    """The `code` of an OpenAI-shaped error body, None when the body is not one."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) and isinstance(error.get("code"), str) else None


def failure_kind(r: RequestResult) -> str:
    """How a failed request failed: its HTTP status ("429", "503", ...) and error code where the answer has
    one ("429 slo_shed"), "stream" (an error event after a 200), or "no_response" (connection error, timeout)."""
    if r.status is None:
        return "no_response"
    if r.status == 200:
        return "stream"
    return f"{r.status} {r.code}" if r.code else str(r.status)


def summarize(results: list[RequestResult], duration: float, load: float, load_kind: str = "qps",
              ttft_slo: float = 1.0, tpot_slo: float = 0.05) -> dict[str, Any]:
    """One load point's numbers; latencies in seconds, goodput in requests per second of the run."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = [r for r in ok if r.ttft is not None and r.ttft <= ttft_slo and r.tpot <= tpot_slo]
    summary: dict[str, Any] = {
        load_kind: load, "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "request_throughput": len(ok) / duration if duration else 0.0,
        "output_tok_s": out_tokens / duration if duration else 0.0,
        "total_tok_s": (out_tokens + in_tokens) / duration if duration else 0.0,
        "output_tokens": out_tokens, "prompt_tokens": in_tokens,
        "goodput": len(good) / duration if duration else 0.0, "ttft_slo_s": ttft_slo, "tpot_slo_s": tpot_slo,
    }
    summary.update(_stats([r.ttft for r in ok if r.ttft is not None], "ttft"))
    summary.update(_stats([x for r in ok for x in r.itls], "itl"))
    summary.update(_stats([r.tpot for r in ok if r.output_tokens > 1], "tpot"))
    summary.update(_stats([r.e2e for r in ok], "e2e"))
    summary.update(_stats([r.send_lag for r in results], "send_lag"))
    summary.update(_stats([r.connect for r in results if r.connect is not None], "connect"))
    summary.update(_stats([r.headers for r in results if r.headers is not None], "headers"))
    failed = [r for r in results if not r.ok]
    by_kind: dict[str, int] = {}
    for r in failed:
        by_kind[failure_kind(r)] = by_kind.get(failure_kind(r), 0) + 1
    summary["failed_by_status"] = dict(sorted(by_kind.items()))
    # refusals the server answered (an error status): how long a client waited for its "no"; requests shed
    # from the queue (slo_shed: admitted, then too late for their TTFT target) apart, as they answer late
    refused = [r for r in failed if r.status is not None and r.status >= 400]
    summary.update(_stats([r.e2e for r in refused if r.code != "slo_shed"], "reject_latency"))
    summary.update(_stats([r.e2e for r in refused if r.code == "slo_shed"], "shed_latency"))
    # and each kind on its own (issue 18's "< 50 ms" is about arrival refusals, "429 slo_unattainable")
    by_refusal: dict[str, list[float]] = {}
    for r in refused:
        by_refusal.setdefault(failure_kind(r), []).append(r.e2e)
    summary["refusal_latency_by_kind"] = {
        kind: {"n": len(v), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
        for kind, v in sorted(by_refusal.items())}
    errors = [r.error for r in results if r.error]
    if errors:
        summary["first_error"] = errors[0]
    return summary


# -- reports ----------------------------------------------------------------------------------------
def format_point(s: dict[str, Any]) -> str:
    load = f"QPS {s['qps']:g}" if "qps" in s else f"concurrency {s['concurrency']}"
    return (f"{load}: {s['completed']}/{s['num_requests']} ok, goodput {s['goodput']:.2f} req/s, "
            f"out {s['output_tok_s']:.1f} tok/s, TTFT p50 {s['ttft_p50'] * 1e3:.1f} ms p99 "
            f"{s['ttft_p99'] * 1e3:.1f} ms, ITL p50 {s['itl_p50'] * 1e3:.1f} ms p99 {s['itl_p99'] * 1e3:.1f} ms, "
            f"send lag p99 {s.get('send_lag_p99', 0.0) * 1e3:.1f} ms, "
            f"headers p99 {s.get('headers_p99', math.nan) * 1e3:.1f} ms" + _failures(s))


def _failures(s: dict[str, Any]) -> str:
    """The failed requests by status and code, and how fast each kind of refusal came back ("" when none
    failed): refused at arrival (429 slo_unattainable) and shed from the queue (429 slo_shed) apart."""
    if not s.get("failed"):
        return ""
    kinds = ", ".join(f"{n} {kind}" for kind, n in s.get("failed_by_status", {}).items())
    text = f", failed: {kinds}"
    timed = s.get("refusal_latency_by_kind") or {}
    if timed:
        text += "; answered in " + ", ".join(
            f"{kind} p50 {t['p50'] * 1e3:.1f} ms p99 {t['p99'] * 1e3:.1f} ms" for kind, t in timed.items())
    return text


def lag_warning(s: dict[str, Any], client_procs: int, limit: float = SEND_LAG_WARN_S) -> str | None:
    """A line when the client itself sent late: past that, TTFT and ITL measure the client, not the server."""
    lag = s.get("send_lag_p99", 0.0)
    if not lag > limit:
        return None
    return (f"  warning: send lag p99 {lag * 1e3:.1f} ms > {limit * 1e3:.0f} ms: the client fell behind its "
            f"arrival times with {client_procs} process(es): use --client-procs {client_procs * 2}")


def append_benchmarks_md(path: str, points: list[dict[str, Any]], gpu: str, command: str,
                         baseline: str = "-", ratio: str = "-") -> None:
    """One BENCHMARKS.md row for the sweep: the best goodput point and the TTFT/ITL at it."""
    from meshserve.bench.report import append_benchmarks_row

    best = max(points, key=lambda s: s["goodput"])
    load = f"QPS {best['qps']:g}" if "qps" in best else f"concurrency {best['concurrency']}"
    result = (f"W3 goodput {best['goodput']:.1f} req/s at {load} (TTFT p50 {best['ttft_p50']:.3f} s, "
              f"ITL p50 {best['itl_p50'] * 1e3:.1f} ms, {best['output_tok_s']:.0f} out tok/s); "
              + ", ".join(f"{p.get('qps', p.get('concurrency')):g}: {p['goodput']:.1f}" for p in points))
    append_benchmarks_row(path, gpu, command, result, baseline, ratio, "-")


def write_plot(path: str, points: list[dict[str, Any]]) -> str:
    """Latency (TTFT and ITL, p50 and p99) against load; PNG via matplotlib if present, else SVG."""
    from meshserve.bench.plots import write_line_plots

    key = "qps" if "qps" in points[0] else "concurrency"
    xs = [float(p[key]) for p in points]
    series = {name: (xs, [p[name] * 1e3 for p in points])
              for name in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99")}
    return write_line_plots(path, [("latency (ms)", series)], key)


# -- command line -----------------------------------------------------------------------------------
def add_serve_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("serve", help="W3: load an OpenAI-compatible server (Poisson QPS or concurrency)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("MESHSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--qps", default=",".join(f"{q:g}" for q in W3_QPS),
                   help="comma-separated request rates (Poisson arrivals); 'inf' sends all at once")
    p.add_argument("--concurrency", default=None,
                   help="comma-separated fixed concurrencies instead of QPS (closed loop)")
    p.add_argument("--num-prompts", default=None,
                   help="prompts per point, or a comma-separated count for each point; default: W3's max(200, 30 x QPS)")
    p.add_argument("--workload", choices=["w3", "w4"], default="w3",
                   help="w3: Poisson/concurrency load (default); w4: 64 requests sharing a warmed 2,048-id prefix")
    p.add_argument("--dataset", choices=["random", "file"], default="random")
    p.add_argument("--dataset-path", default=None, help=".jsonl with 'prompt' (and 'max_tokens'), or text lines")
    p.add_argument("--prompts-file", default=None, help="same as --dataset file --dataset-path FILE")
    p.add_argument("--response-format-json-schema", default=None, metavar="FILE",
                   help="send response_format json_schema with this schema (e.g. meshserve/bench/data/"
                        "person_schema.json), time the first request apart and score the answers")
    p.add_argument("--score-json-schema", default=None, metavar="FILE",
                   help="score the answers against this schema without sending it (the unconstrained baseline; "
                        "the first request is timed apart too)")
    p.add_argument("--label", default=None, help="engine name for the report (default: the base URL)")
    p.add_argument("--input-len", type=int, default=512, help="random prompts: token ids per prompt")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--max-token-id", type=int, default=10000, help="random prompts: ids drawn in [3, this]")
    p.add_argument("--seed", type=int, default=None, help="default: W3's 1000 + QPS for each point")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="goodput SLO on TTFT, seconds")
    p.add_argument("--tpot-slo", type=float, default=0.05, help="goodput SLO on time per output token, seconds")
    p.add_argument("--output-json", default=None)
    p.add_argument("--benchmarks-md", default=None, help="append a row to this BENCHMARKS.md")
    p.add_argument("--gpu", default="unknown GPU", help="GPU named in the BENCHMARKS.md row")
    p.add_argument("--baseline", default="-", help="baseline measured in the same run, for the row")
    p.add_argument("--plot", default=None, help="latency-vs-load plot (.png needs matplotlib; else .svg)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--client-procs", type=_positive_int, default=1,
                   help="spread each point's requests (request i to process i %% N) over N client processes "
                        "sharing one start time, for loads one Python event loop cannot send on time")
    p.set_defaults(func=run_serve_bench)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _server_model(base_url: str, api_key: str | None, model: str | None) -> str:
    """`model`, or the server's first at /v1/models; either way the server must answer (a whole sweep of
    refused connections would otherwise run, point by point)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/models"
    try:
        resp = httpx.get(url, headers=headers, timeout=30)
    except httpx.TransportError as e:  # nothing listening, a name that does not resolve, a timeout
        raise unreachable(base_url, e) from None
    if model:
        return model  # any answer will do: the requests' own errors say what else is wrong
    if resp.status_code in (401, 403):
        raise MeshserveError(f"the server at {base_url} refused GET /v1/models ({resp.status_code}): pass its key "
                             "with --api-key (or $MESHSERVE_API_KEY)")
    if resp.status_code != 200:
        raise MeshserveError(f"the server at {base_url} answered {resp.status_code} to GET /v1/models; pass the "
                             "model's name with --model")
    try:
        return resp.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise MeshserveError(f"the server at {base_url} lists no model at /v1/models (not an OpenAI-compatible "
                             "server?); pass the model's name with --model") from None


def _strict_json(value: Any) -> Any:
    """Standard JSON: an unbounded rate becomes "inf", a statistic with no samples null."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else None
    return value


def run_serve_bench(ns: argparse.Namespace) -> int:
    from meshserve.bench import serve_structured as structured

    if ns.prompts_file:
        ns.dataset, ns.dataset_path = "file", ns.prompts_file
    check_serve_bench_args(ns)  # before the server is asked anything
    loads, counts = loads_and_counts(ns)
    if ns.dataset == "file":
        file_requests(ns.dataset_path, math.inf, 1, ns.output_len)  # a malformed file fails now, not mid-run
    schema_path = ns.response_format_json_schema or ns.score_json_schema
    schema = structured.load_schema(schema_path) if schema_path else None
    extra_body = (structured.response_format(schema, os.path.splitext(os.path.basename(schema_path))[0])
                  if ns.response_format_json_schema else None)
    model = _server_model(ns.base_url, ns.api_key, ns.model)
    chat = ns.endpoint == "chat"
    if ns.workload == "w4":
        return _run_w4(ns, model)
    first = None
    if schema is not None:  # alone, before the load: a constraint new to the server compiles in its TTFT
        req = (file_requests(ns.dataset_path, math.inf, 1, ns.output_len) if ns.dataset == "file" else
               w3_requests(math.inf, 1, ns.input_len, ns.output_len, 0, ns.max_token_id))[0]
        first = structured.first_request(ns.base_url, model, req, chat=chat, temperature=ns.temperature,
                                         ignore_eos=not ns.no_ignore_eos, api_key=ns.api_key, extra_body=extra_body)
    points = []
    for i, (kind, load) in enumerate(loads):
        qps = float(load) if kind == "qps" else math.inf
        n = counts[i % len(counts)]
        if n is None and kind == "concurrency":
            n = max(200, 30 * int(load))
        seed = ns.seed if ns.seed is not None else 1000 + int(load if math.isfinite(load) else 0)
        if ns.dataset == "file":
            reqs = file_requests(ns.dataset_path, qps, n, ns.output_len, seed)
        else:
            reqs = w3_requests(qps, n, ns.input_len, ns.output_len, seed, ns.max_token_id)
        load_kwargs = {"chat": chat, "concurrency": int(load) if kind == "concurrency" else None,
                       "temperature": ns.temperature, "ignore_eos": not ns.no_ignore_eos, "api_key": ns.api_key,
                       "progress": not ns.no_progress, "extra_body": extra_body}
        wall_start = time.time()
        if ns.client_procs == 1:
            results, duration = asyncio.run(run_load(ns.base_url, model, reqs, **load_kwargs))
        else:
            from meshserve.bench.client_procs import run_load_in_procs

            results, duration = run_load_in_procs(ns.client_procs, ns.base_url, model, reqs, **load_kwargs)
        summary = summarize(results, duration, load, kind, ns.ttft_slo, ns.tpot_slo)
        # the point's wall-clock bounds: to cut per-second logs (tools/proc_cpu.py log, GPU clocks) by point
        summary["wall_start"], summary["wall_end"] = wall_start, time.time()
        points.append(summary)
        print(format_point(summary), flush=True)
        if schema is not None:
            summary.update(structured.structured_stats(results, schema))
            print(structured.format_point(summary), flush=True)
        warning = lag_warning(summary, ns.client_procs)
        if warning:
            print(warning, flush=True)
        if summary["failed"]:
            print(f"  {summary['failed']} failed; first error: {summary.get('first_error')}", flush=True)
        # after every point, so a run cut short by a time limit keeps the points it measured
        report = _write_report(ns, model, points, schema, extra_body, first)
    if ns.benchmarks_md:
        append_benchmarks_md(ns.benchmarks_md, points, ns.gpu, report["command"], ns.baseline)
    if ns.plot:
        print(f"plot: {write_plot(ns.plot, points)}")
    return 0 if all(p["completed"] for p in points) else 1


def _write_report(ns: argparse.Namespace, model: str, points: list[dict], schema, extra_body, first) -> dict:
    """The run's report so far; written to --output-json when given."""
    command = "meshserve bench " + shlex.join(sys.argv[sys.argv.index("serve"):] if "serve" in sys.argv else [])
    report = {"base_url": ns.base_url, "model": model, "endpoint": ns.endpoint, "command": command,
              "client_procs": ns.client_procs, "points": points, "engine": ns.label or ns.base_url}
    if schema is not None:
        report.update(schema=schema, response_format=bool(extra_body), first_request=first)
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(_strict_json(report), f, indent=2)
    return report


def _run_w4(ns: argparse.Namespace, model: str) -> int:
    """W4: warm the prefix with one request, then send the 64 sharing it at once; report their TTFT."""
    warm, reqs = w4_requests()
    kwargs = {"temperature": 0.0, "ignore_eos": True, "api_key": ns.api_key, "progress": False}
    asyncio.run(run_load(ns.base_url, model, [warm], **kwargs))
    results, duration = asyncio.run(run_load(ns.base_url, model, reqs, **kwargs))
    summary = summarize(results, duration, math.inf, "qps", ns.ttft_slo, ns.tpot_slo)
    summary["batch_seconds"] = duration
    print(f"W4: 64 requests sharing a 2,048-token prefix: batch {duration:.3f} s, TTFT p50 "
          f"{summary['ttft_p50']:.3f} s, p99 {summary['ttft_p99']:.3f} s, {summary['failed']} failed", flush=True)
    if summary["failed"]:
        print(f"  first error: {summary.get('first_error')}", flush=True)
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(_strict_json({"workload": "W4", "model": model, "points": [summary]}), f, indent=2)
    return 0 if summary["completed"] else 1
