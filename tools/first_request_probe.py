"""The first requests of a fresh engine (issue 29): a user's LLM(...) in a new process, one 16-token request,
then W1 (128-token prompt, 256 new tokens, greedy) three times; each timed, with the Triton kernels compiled
during it (new entries in TRITON_CACHE_DIR: set it to an empty directory to count them).

usage: TRITON_CACHE_DIR=/tmp/tc python tools/first_request_probe.py [MODEL] [--json PATH]
"""

import json
import os
import random
import sys
import time

from meshserve import LLM, SamplingParams


def cache_dir() -> str:
    return os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))


def kernel_names() -> set[str]:
    """Names of the compiled kernels in the cache (one folder per compile, holding NAME.json)."""
    d = cache_dir()
    if not os.path.isdir(d):
        return set()
    return {
        f"{entry}/{f[:-5]}"
        for entry in os.listdir(d)
        for f in os.listdir(os.path.join(d, entry))
        if f.endswith(".json") and not f.startswith("__grp__")
    }


def cache_entries() -> int:
    return len(kernel_names())


def main():
    model = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "llama-3.1-8b"
    out_path = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    t0 = time.perf_counter()
    c0 = cache_entries()
    llm = LLM(model=model, load_format="dummy", dtype="bfloat16", max_model_len=4096)
    rows = [{"what": "start", "s": round(time.perf_counter() - t0, 2), "new_kernels": cache_entries() - c0}]
    random.seed(0)
    w1 = {"prompt_token_ids": [random.randint(0, 10000) for _ in range(128)]}
    runs = [("16-token request", {"prompt_token_ids": [5] * 16}, 16)] + [
        (f"W1 #{i}", w1, 256) for i in (1, 2, 3)
    ]
    for name, prompt, n in runs:
        before = kernel_names()
        t = time.perf_counter()
        out = llm.generate(
            [prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False
        )
        dt = time.perf_counter() - t
        k = len(out[0].outputs[0].token_ids)
        rows.append(
            {
                "what": name,
                "s": round(dt, 3),
                "tok_s": round(k / dt, 1),
                "new_kernels": sorted(n.split("/")[1] for n in kernel_names() - before),
            }
        )
        print(rows[-1], flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)
    llm.shutdown()


if __name__ == "__main__":
    main()
