"""The table of tools/peer_side_by_side.sh: meshserve's decode curve, W1 and W2 beside vLLM's from one device call.

usage: python tools/peer_compare.py VLLM_LOG MESHSERVE_CURVE_JSON MESHSERVE_W2_JSON

VLLM_LOG holds the peer's `RESULT {...}` line (../shared/tools/vllm-peer/bench.py); the two JSON files are
`meshserve bench latency --curve ... --output-json` and `meshserve bench throughput --output-json`. A missing
side prints "-". Both curves are bs * 127 / (t(128 new tokens) - t(1)) over the same random prompts of 128.
"""

from __future__ import annotations

import json
import os
import sys


def vllm_result(path: str) -> dict:
    """The last RESULT line's JSON in a vLLM peer log ({} when there is none)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else {}


def _load(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _num(x, fmt=".1f") -> str:
    return format(x, fmt) if x else "-"


def rows(vllm: dict, curve: dict, w2: dict) -> list[tuple[str, str, str, str]]:
    """(what, meshserve, vLLM, ratio) rows: decode tok/s at each batch of either curve, W1, W2."""
    ours = {int(b): v for b, v in curve.get("decode_tok_s_by_batch", {}).items()}
    theirs = {int(b): v for b, v in vllm.get("decode_tok_s_by_batch", {}).items()}
    out = []
    for b in sorted(set(ours) | set(theirs)):
        out.append((f"decode tok/s, batch {b}", _num(ours.get(b)), _num(theirs.get(b)),
                    _ratio(ours.get(b), theirs.get(b))))
    out.append(("W1 tok/s (decode)", f"{_num(curve.get('tok_s'))} ({_num(curve.get('decode_tok_s'))})",
                f"{_num(vllm.get('w1_tok_s_end_to_end'))} ({_num(vllm.get('w1_decode_tok_s'))})",
                _ratio(curve.get("tok_s"), vllm.get("w1_tok_s_end_to_end"))))
    runs = "/".join(f"{s:.2f}" for s in w2.get("seconds_runs", []))
    out.append(("W2 output tok/s (s)", f"{_num(w2.get('output_tok_s'))} ({_num(w2.get('seconds'), '.2f')}; runs {runs or '-'})",
                f"{_num(vllm.get('w2_output_tok_s'))} ({_num(vllm.get('w2_seconds'), '.2f')})",
                _ratio(w2.get("output_tok_s"), vllm.get("w2_output_tok_s"))))
    if w2.get("output_tokens") and vllm.get("w2_output_tokens") and w2["output_tokens"] != vllm["w2_output_tokens"]:
        out.append(("W2 output tokens differ", str(w2["output_tokens"]), str(vllm["w2_output_tokens"]), "!"))
    return out


def main(argv: list[str]) -> None:
    vllm, curve, w2 = vllm_result(argv[0]), _load(argv[1]), _load(argv[2])
    print(f"model {curve.get('model') or vllm.get('model', '-')}; vLLM {vllm.get('vllm', '-')}, start "
          f"{_num(vllm.get('start_s'))} s, copy {_num(vllm.get('copy_TBps'), '.2f')} TB/s")
    print(f"{'':<26} {'meshserve':>34} {'vLLM':>18} {'ratio':>6}")
    for what, ours, theirs, ratio in rows(vllm, curve, w2):
        print(f"{what:<26} {ours:>34} {theirs:>18} {ratio:>6}")


if __name__ == "__main__":
    main(sys.argv[1:])
