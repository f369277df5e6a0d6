"""Multi-turn chat through KV offload tiers: `python -m meshserve.bench.multiturn` (issue 26's workload).

For each configuration (no offload; CPU tier; a small CPU tier in front of a disk tier) it starts `meshserve
serve` with a GPU pool of --gpu-blocks blocks (several times smaller than the conversations' histories), warms
it up, drives the multi-turn workload of multiturn_workload.py through streaming /v1/completions (token-id
prompts, `return_token_ids` so each next turn re-sends the model's own answer), and stops it. Per configuration:
goodput (requests meeting the TTFT and TPOT targets per second of the run, as W3), TTFT p50/p99 of all turns
and of the revisits (turns >= 1), the prefix hit rate (prompt tokens served from cache, GPU or restored from
an offload tier, over prompt tokens admitted: the server's vllm:prefix_cache_* and
vllm:external_prefix_cache_hits counters across the run) and the offload tiers' hits; then each configuration's goodput over no offload's. JSON lines on stdout, all
rows in --output.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from typing import Any

import numpy as np

from meshserve.bench.multiturn_workload import Conversation, MultiTurnSpec, multiturn_conversations
from meshserve.bench.serve_bench import (
    BenchRequest,
    RequestResult,
    request_body,
    send_request,
    summarize,
)

# vLLM's prefix-cache counters (tokens, summed over engines): GPU hits, and those restored from an offload tier
HITS = ("vllm:prefix_cache_hits_total", "vllm:external_prefix_cache_hits_total")
QUERIES = "vllm:prefix_cache_queries_total"
TIER_HITS = 'meshserve:kv_offload_hits_total{{tier="{}"}}'


@dataclasses.dataclass
class TurnResult:
    conversation: int
    turn: int
    prompt: list[int]  # the ids sent
    result: RequestResult


async def run_conversations(base_url: str, model: str, conversations: list[Conversation], *,
                            max_duration_s: float = math.inf, timeout: float = 600.0,
                            ) -> tuple[list[TurnResult], float, int]:
    """Drive every conversation from its start time: a turn is sent when the previous answer has come back and
    its think time passed, with the previous prompt + the returned answer ids + the user's ids. No turn is sent
    after max_duration_s (the run's clock); a failed turn ends its conversation. Returns the turns' results,
    the wall time until the last answer, and how many turns were never sent."""
    import httpx

    url = base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    done: list[TurnResult] = []
    unsent = 0
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()

        async def converse(index: int, conv: Conversation) -> None:
            nonlocal unsent
            send_at = start + conv.start_at
            prompt = conv.opening
            for turn in range(conv.turns):
                await asyncio.sleep(max(0.0, send_at - time.perf_counter()))
                if time.perf_counter() - start > max_duration_s:
                    unsent += conv.turns - turn
                    return
                lag = time.perf_counter() - send_at
                body = request_body(BenchRequest(prompt, conv.answer_len), model, chat=False, temperature=0.0,
                                    ignore_eos=True, extra={"return_token_ids": True})
                res = await send_request(client, url, body, chat=False)
                res.send_lag = lag
                if res.ok and len(res.token_ids) != res.output_tokens:
                    res.ok, res.error = False, (f"the server returned {len(res.token_ids)} answer ids for "
                                                f"{res.output_tokens} tokens (return_token_ids unsupported?)")
                done.append(TurnResult(index, turn, prompt, res))
                if not res.ok:
                    unsent += conv.turns - turn - 1
                    return
                if turn + 1 < conv.turns:
                    prompt = conv.next_prompt(prompt, res.token_ids, turn + 1)
                    send_at = time.perf_counter() + conv.think_s[turn]

        await asyncio.gather(*(converse(i, c) for i, c in enumerate(conversations)))
        duration = time.perf_counter() - start
    return done, duration, unsent


def cache_counters(samples: dict[str, float]) -> dict[str, float]:
    """The prefix-cache (tokens: the GPU cache's hits and the offload tiers') and offload-tier (blocks) hit
    counters of a /metrics scrape."""

    def total(*names: str) -> float:  # every engine's series
        return sum(v for k, v in samples.items() if k.split("{")[0] in names)

    return {"hits": total(*HITS), "queries": total(QUERIES),
            "cpu_hits": samples.get(TIER_HITS.format("cpu"), 0.0),
            "disk_hits": samples.get(TIER_HITS.format("disk"), 0.0)}


def summarize_run(turns: list[TurnResult], duration: float, unsent: int, before: dict[str, float],
                  after: dict[str, float], ttft_slo: float, tpot_slo: float) -> dict[str, Any]:
    """summarize()'s numbers over all turns, plus revisit TTFTs, the prefix hit rate and tier hits."""
    results = [t.result for t in turns]
    row = summarize(results, duration, len({t.conversation for t in turns}), "conversations", ttft_slo, tpot_slo)
    revisits = [t.result.ttft for t in turns if t.turn > 0 and t.result.ok]
    if revisits:  # turns >= 1: the ones a cache can serve
        row["ttft_revisit_p50"], row["ttft_revisit_p99"] = (float(x) for x in np.percentile(revisits, [50, 99]))
    row["turns_unsent"] = unsent
    d = {k: after[k] - before[k] for k in before}
    row["prefix_hit_rate"] = d["hits"] / d["queries"] if d["queries"] else 0.0
    row["kv_offload_cpu_hit_blocks"], row["kv_offload_disk_hit_blocks"] = d["cpu_hits"], d["disk_hits"]
    prompt = sum(r.prompt_tokens for r in results if r.ok)
    cached = sum(r.cached_tokens or 0 for r in results if r.ok)
    row["usage_cached_frac"] = cached / prompt if prompt else 0.0  # the same, as the answers' usage says
    return row


def measure(base_url: str, conversations: list[Conversation], *, max_duration_s: float = math.inf,
            ttft_slo: float = 1.0, tpot_slo: float = 0.05, model: str = "bench") -> dict[str, Any]:
    """One configuration's row against a ready server: counters, the workload, counters again."""
    from meshserve.bench.local_server import scrape

    before = cache_counters(scrape(base_url))
    turns, duration, unsent = asyncio.run(run_conversations(base_url, model, conversations,
                                                            max_duration_s=max_duration_s))
    time.sleep(0.5)  # the core publishes its counters with its steps: let the last one land
    after = cache_counters(scrape(base_url))
    return summarize_run(turns, duration, unsent, before, after, ttft_slo, tpot_slo)


def warm_up(base_url: str, spec: MultiTurnSpec) -> None:
    """Two conversations of two turns at the workload's sizes, from their own draws (seed + 1000), so that
    compiling the first prefill and the first prefill after a cached prefix is not measured."""
    warm = dataclasses.replace(spec, conversations=2, turns=2, think_mean_s=0.0, start_rate=1000.0,
                               seed=spec.seed + 1000)
    turns, _, _ = asyncio.run(run_conversations(base_url, "bench", multiturn_conversations(warm)))
    failed = [t.result.error for t in turns if not t.result.ok]
    if failed or len(turns) != 4:
        raise SystemExit(f"warm-up failed: {failed[0] if failed else 'turns missing'}")


def configurations(ns: argparse.Namespace) -> dict[str, list[str]]:
    """Server flags of each configuration (beside the shared ones)."""
    disk_path = ns.disk_path or tempfile.mkdtemp(prefix="meshserve-kv-multiturn-")
    return {
        "no-offload": [],
        "cpu": ["--kv-offloading-size", str(ns.cpu_gib)],
        "cpu+disk": ["--kv-offloading-size", str(ns.staging_cpu_gib), "--kv-offloading-disk-path", disk_path,
                     "--kv-offloading-disk-size", str(ns.disk_gib)],
    }


def run_configuration(name: str, flags: list[str], spec: MultiTurnSpec, ns: argparse.Namespace) -> dict:
    from meshserve.bench.local_server import start_server, stop, wait_ready

    args = ["--load-format", ns.load_format, "--max-model-len", str(spec.max_model_len),
            "--num-gpu-blocks-override", str(ns.gpu_blocks), *flags, *ns.server_args]
    url = f"http://127.0.0.1:{ns.port}"
    t0 = time.perf_counter()
    proc = start_server(ns.model, ns.port, args, os.path.join(ns.log_dir, f"multiturn-{name.replace('+', '-')}.log"))
    try:
        wait_ready(url, [proc], ns.ready_timeout)
        ready_s = time.perf_counter() - t0
        warm_up(url, spec)
        row = {"config": name, "server_ready_s": round(ready_s, 1)}
        row.update(measure(url, multiturn_conversations(spec), max_duration_s=ns.max_duration,
                           ttft_slo=ns.ttft_slo, tpot_slo=ns.tpot_slo))
        return row
    finally:
        stop([proc])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    spec_defaults = MultiTurnSpec()
    for f in dataclasses.fields(MultiTurnSpec):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(spec_defaults, f.name)),
                        default=getattr(spec_defaults, f.name))
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--gpu-blocks", type=int, default=2048, help="GPU pool in blocks (16 tokens each)")
    ap.add_argument("--cpu-gib", type=float, default=24.0, help="the CPU tier of the cpu configuration")
    ap.add_argument("--staging-cpu-gib", type=float, default=4.0, help="the CPU tier in front of the disk")
    ap.add_argument("--disk-gib", type=float, default=24.0)
    ap.add_argument("--disk-path", default=None, help="disk tier folder (default: a fresh one under the temp dir)")
    ap.add_argument("--configs", default="no-offload,cpu,cpu+disk")
    ap.add_argument("--max-duration", type=float, default=60.0, help="no turn is sent after this (s)")
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tpot-slo", type=float, default=0.05)
    ap.add_argument("--port", type=int, default=8760)
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--log-dir", default=".")
    ap.add_argument("--output", default="multiturn_bench.json")
    ap.add_argument("--server-args", default="", help="more `meshserve serve` flags, one string")
    ns = ap.parse_args(argv)
    ns.server_args = ns.server_args.split()
    spec = MultiTurnSpec(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(MultiTurnSpec)})
    try:
        multiturn_conversations(spec)
    except ValueError as e:
        ap.error(str(e))
    # a SIGTERM (the device script's timeout) unwinds through run_configuration's finally: the server stops too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if ns.gpu_blocks * 16 < spec.max_model_len:
        ap.error(f"--gpu-blocks {ns.gpu_blocks} (x 16 tokens) cannot hold one {spec.max_model_len}-token turn")
    known = configurations(ns)
    names = ns.configs.split(",")
    if unknown := [n for n in names if n not in known]:
        ap.error(f"unknown configuration(s) {unknown}; choose from {list(known)}")
    print(json.dumps({"workload": dataclasses.asdict(spec), "max_model_len": spec.max_model_len,
                      "live_prefix_tokens": spec.live_prefix_tokens(), "gpu_pool_tokens": ns.gpu_blocks * 16,
                      "pool_oversubscription": round(spec.live_prefix_tokens() / (ns.gpu_blocks * 16), 2)}),
          flush=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        rows.append(run_configuration(name, known[name], spec, ns))
        print(json.dumps(_brief(rows[-1])), flush=True)
        base = next((r["goodput"] for r in rows if r["config"] == "no-offload"), None)
        for row in rows:
            row["goodput_vs_no_offload"] = round(row["goodput"] / base, 2) if base else None
        with open(ns.output, "w") as f:  # after each configuration: a run cut short keeps the rows it made
            json.dump({"workload": dataclasses.asdict(spec), "gpu_blocks": ns.gpu_blocks, "rows": rows}, f,
                      indent=1)
    for row in rows:
        print(f"{row['config']}: goodput {row['goodput']:.2f} req/s ({row['goodput_vs_no_offload']}x no offload), "
              f"prefix hit rate {row['prefix_hit_rate']:.3f}, TTFT p50 {row['ttft_p50']:.3f} s p99 "
              f"{row['ttft_p99']:.3f} s, {row['completed']} turns ok, {row['turns_unsent']} unsent", flush=True)
    return 0


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("config", "server_ready_s", "goodput", "completed", "failed", "turns_unsent", "duration_s",
            "prefix_hit_rate", "usage_cached_frac", "kv_offload_cpu_hit_blocks", "kv_offload_disk_hit_blocks",
            "ttft_p50", "ttft_p99", "ttft_revisit_p50", "ttft_revisit_p99", "tpot_p50", "tpot_p99", "first_error")
    return {k: round(row[k], 4) if isinstance(row.get(k), float) else row[k] for k in keys if k in row}


if __name__ == "__main__":
    sys.exit(main())
