"""The temperature-only sampler (kernels/triton_sampling.py) per batch size on the GPU: its device time per
call (CUDA events over back-to-back calls) beside the bytes it reads at the copy bandwidth.

usage: python tools/bench_sampling.py [--vocab 151936] [--rows 1,4,16,64,128,256] [--old PATH] [--greedy]

--old PATH times a second module's sample_gumbel too (e.g. the previous kernels/triton_sampling.py copied
aside: the A/B of a kernel change in one process) and checks that both draw from the same distribution on
the spot: the greedy rows' ids equal, the sampled ids' median rank within their rows alike.
--greedy times the all-greedy argmax instead: greedy_argmax (the same pass without noise) beside torch's argmax,
each row count's ids checked equal (where greedy_argmax should stop: triton_sampling.GREEDY_MAX_ROWS).
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from meshserve.engine.cuda_graph import captured_us
from meshserve.kernels.triton_sampling import greedy_argmax, sample_gumbel


def _median_rank(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """The median over rows of a sampled id's rank in its row (0: the row's top id); a coarse look at the
    distribution (tests/kernels/test_triton_sampling.py checks it)."""
    x = logits.float()
    return (x > x.gather(1, ids[:, None])).sum(-1).float().median().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", default="1,4,16,64,128,256")
    ap.add_argument("--old", default=None)
    ap.add_argument("--greedy", action="store_true")
    args = ap.parse_args()
    if args.greedy:
        _greedy(args.vocab, [int(r) for r in args.rows.split(",")])
        return
    old = None
    if args.old:
        spec = importlib.util.spec_from_file_location("old_sampling", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    copy_bw = _copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s; vocab {args.vocab}, bf16 logits, T = 0.6")
    print(f"{'rows':>5} {'new us':>8} {'old us':>8} {'bytes us':>9} {'rank new':>9} {'rank old':>9}")
    for rows in (int(r) for r in args.rows.split(",")):
        g = torch.Generator(device="cuda").manual_seed(rows)
        logits = (2 * torch.randn(rows, args.vocab, generator=g, device="cuda")).bfloat16()
        temps = torch.full((rows,), 0.6, device="cuda")
        new_us = captured_us(lambda x=logits, t=temps: sample_gumbel(x, t, 7))
        rank_new = _median_rank(logits, sample_gumbel(logits, temps, 7))
        old_us = rank_old = float("nan")
        if old is not None:
            old_us = captured_us(lambda x=logits, t=temps: old.sample_gumbel(x, t, 7))
            rank_old = _median_rank(logits, old.sample_gumbel(logits, temps, 7))
            greedy = torch.zeros_like(temps)
            assert torch.equal(sample_gumbel(logits, greedy, 1), old.sample_gumbel(logits, greedy, 1))
        bytes_us = logits.numel() * logits.element_size() / copy_bw * 1e6
        print(f"{rows:>5} {new_us:>8.1f} {old_us:>8.1f} {bytes_us:>9.1f} {rank_new:>9.1f} {rank_old:>9.1f}")


def _greedy(vocab: int, rows_list: list[int]) -> None:
    """The all-greedy step's argmax per row count: greedy_argmax against torch's, in CUDA graphs."""
    print(f"vocab {vocab}, bf16 logits, all greedy")
    print(f"{'rows':>5} {'triton us':>10} {'torch us':>9}")
    for rows in rows_list:
        g = torch.Generator(device="cuda").manual_seed(rows)
        logits = (2 * torch.randn(rows, vocab, generator=g, device="cuda")).bfloat16()
        assert torch.equal(greedy_argmax(logits), logits.argmax(-1))
        triton_us = captured_us(lambda x=logits: greedy_argmax(x))
        torch_us = captured_us(lambda x=logits: x.argmax(-1))
        print(f"{rows:>5} {triton_us:>10.1f} {torch_us:>9.1f}")


def _copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = captured_us(lambda: b.copy_(a), 10)
    return 2 * a.numel() / (us * 1e-6)


if __name__ == "__main__":
    main()
