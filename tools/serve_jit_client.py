"""Mixed requests against a running meshserve server, for tools/serve_jit_probe.sh: prompts of 1 to 3,000 token
ids under every sampling path (greedy, temperature, top-k/top-p, min-p, penalties, logprobs, seeds, logit bias,
min_tokens, structured outputs), sent in concurrent bursts so chunked prefills ride beside decodes, some past
the mixed-step graphs. Prints the number of requests answered and failed.

usage: python tools/serve_jit_client.py [--url http://localhost:8000] [--rounds 3] [--burst 48]
"""

from __future__ import annotations

import argparse
import json
import random
import urllib.request
from concurrent.futures import ThreadPoolExecutor

LENGTHS = (1, 15, 17, 100, 300, 1000, 3000)
KINDS = [
    {"temperature": 0},
    {"temperature": 0.8},
    {"temperature": 0.8, "top_k": 20},
    {"temperature": 0.8, "top_p": 0.9},
    {"temperature": 0.8, "top_k": 20, "top_p": 0.9},
    {"temperature": 0.8, "min_p": 0.05},
    {"temperature": 0.8, "repetition_penalty": 1.2, "presence_penalty": 0.3, "frequency_penalty": 0.3},
    {"temperature": 0.8, "logprobs": 3},
    {"temperature": 0, "logprobs": 2},
    {"temperature": 0.8, "seed": 7},
    {"temperature": 0.8, "logit_bias": {"5": 2.0}},
    {"temperature": 0.8, "min_tokens": 8},
    {"temperature": 0.8, "structured_outputs": {"json_object": True}},
]


def post(url: str, body: dict) -> bool:
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return bool(json.load(r)["choices"])
    except Exception as e:  # noqa: BLE001 (a probe reports failures, it does not stop on them)
        print(f"request failed: {e}")
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://localhost:8000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--burst", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=4096, help="the server's --max-model-len")
    args = ap.parse_args()
    rng = random.Random(7)
    ok = failed = 0
    for r in range(args.rounds):
        bodies = []
        for i in range(args.burst):
            n = min(LENGTHS[i % len(LENGTHS)], args.max_len - 64)
            ids = [rng.randint(3, 10000) for _ in range(n)]
            bodies.append(
                {
                    "prompt": ids,
                    "max_tokens": rng.choice((8, 32, 48)),
                    "ignore_eos": True,
                    **KINDS[(i + r) % len(KINDS)],
                }
            )
        with ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(lambda b: post(args.url, b), bodies))
        ok += sum(results)
        failed += len(results) - sum(results)
        for kind in KINDS[:3]:  # alone: batch-1 decode at each of the first kinds
            good = post(args.url, {"prompt": [5] * 17, "max_tokens": 8, **kind})
            ok, failed = ok + good, failed + (not good)
    print(f"mixed client: {ok} answered, {failed} failed")


if __name__ == "__main__":
    main()
