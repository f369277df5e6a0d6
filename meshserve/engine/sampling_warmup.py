"""Start-up warm-up of the sampling paths: every Triton kernel a request's sampling settings can reach is built
before serving, not inside the TTFT of the first request that asks for it.

The forward's kernels compile during the profile run, warm_up_prefill and the graph captures. The sampling
paths run after the forward, outside the graphs, and only for the requests that ask for them: the LM head's
batch-1 GEMV (Triton, one row of logits), the fused temperature-only sampler (Triton), the grammar masks'
kernel (Triton, kernels/triton_token_bitmask.py: one compile for every row count; no xgrammar, which waits for
the first grammar request), and the torch paths of top-k, top-p, min-p, penalties, logit bias, allowed and
banned ids, seeds and logprobs (no Triton, but their first launch loads CUDA modules lazily). A cold Triton cache
pays ~0.5 s per compile inside a user's request (issue 18: TTFT p99 0.9-1.5 s at QPS 4-8). Each case below runs the
StepSampler's steps without its state (no generators kept, no sampled ids remembered): logits of dummy hidden
rows, masks, then the Sampler.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from meshserve.engine.scheduler_output import ScheduledSequence
from meshserve.engine.step_sampler import sample_rows
from meshserve.layers.sampler import Sampler
from meshserve.sampling import SamplingParams
from meshserve.structured.bitmask import ALLOW_ALL

logger = logging.getLogger(__name__)

@dataclass
class WarmupCase:
    """One sampling path: the batch's per-row settings and what else the step applies."""

    name: str
    params: list[SamplingParams]
    banned: bool = False  # min_tokens not reached yet: the stop ids are banned
    bitmask_rows: list[int] = field(default_factory=list)  # rows under a grammar (all tokens allowed)


def warmup_cases() -> list[WarmupCase]:
    """A case per sampling path a request can take (layers/sampler.py, engine/step_sampler.py)."""
    greedy = SamplingParams(temperature=0.0)
    hot = SamplingParams(temperature=0.8)
    cases = [
        WarmupCase("greedy", [greedy]),  # the plain argmax (and the LM head's batch-1 GEMV)
        WarmupCase("temperature", [hot]),  # the fused Triton sampler
        WarmupCase("temperature+greedy", [hot, greedy, hot]),
        WarmupCase("top_k", [SamplingParams(temperature=0.8, top_k=5)] * 2),
        WarmupCase("top_p", [SamplingParams(temperature=0.8, top_p=0.9)] * 2),
        WarmupCase("top_k+top_p", [SamplingParams(temperature=0.8, top_k=5, top_p=0.9), greedy]),
        WarmupCase("min_p", [SamplingParams(temperature=0.8, min_p=0.1)]),
        WarmupCase(
            "penalties",
            [
                SamplingParams(
                    temperature=0.8, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5
                ),
                greedy,
            ],
        ),
        WarmupCase("greedy+penalties", [SamplingParams(temperature=0.0, repetition_penalty=1.1)]),
        WarmupCase(
            "logprobs",
            [SamplingParams(temperature=0.8, logprobs=5), SamplingParams(temperature=0.0, logprobs=0)],
        ),
        WarmupCase("greedy+logprobs", [SamplingParams(temperature=0.0, logprobs=2)]),
        WarmupCase("seeded", [SamplingParams(temperature=0.8, seed=0), hot]),
        WarmupCase("logit_bias", [SamplingParams(temperature=0.8, logit_bias={0: 1.0}), greedy]),
        WarmupCase("allowed_token_ids", [SamplingParams(temperature=0.8, allowed_token_ids=[0, 1]), greedy]),
        WarmupCase("banned", [hot, greedy], banned=True),
    ]
    # the grammar masks' kernel on the logits in place (its row count is unspecialized: one launch builds it)
    cases.append(WarmupCase("bitmask", [hot, greedy, hot], bitmask_rows=[1]))  # others: all ones
    return cases


def warmup_rows(case: WarmupCase) -> list[ScheduledSequence]:
    """The case's rows as the StepSampler sees them: a short prompt and output."""
    return [
        ScheduledSequence(
            seq_id=f"warmup-{i}", token_ids=[4], num_computed_tokens=4, block_table=[], params=p,
            do_sample=True, prompt_token_ids=[1, 2, 3], output_token_ids=[4],
        )
        for i, p in enumerate(case.params)
    ]


def warmup_bitmask(case: WarmupCase, vocab_size: int) -> torch.Tensor | None:
    """The step's grammar bitmask of the case (a row per row, packed as xgrammar fills it): every token
    allowed, on the case's bitmask rows as on the others; None without bitmask rows."""
    if not case.bitmask_rows:
        return None
    return torch.full((len(case.params), (vocab_size + 31) // 32), ALLOW_ALL, dtype=torch.int32)


def run_case(
    case: WarmupCase,
    compute_logits,
    sampler: Sampler,
    hidden_size: int,
    dtype: torch.dtype,
    vocab_size: int,
    device: torch.device,
) -> torch.Tensor:
    """One case through step_sampler.sample_rows, StepSampler's own sampling (no generators kept, no sampled
    ids remembered): the sampled ids [rows]."""
    rows = warmup_rows(case)
    logits = compute_logits(torch.zeros(len(rows), hidden_size, dtype=dtype, device=device))
    banned = [[0] if case.banned else [] for _ in rows]

    def generator_of(s: ScheduledSequence) -> torch.Generator | None:
        if s.params.seed is None or s.params.greedy:
            return None
        return torch.Generator(device=device).manual_seed(s.params.seed)

    return sample_rows(sampler, logits, rows, banned, generator_of, vocab_size, device,
                       warmup_bitmask(case, vocab_size))[0]


@torch.inference_mode()
def warm_up_sampling(
    compute_logits,
    sampler: Sampler,
    hidden_size: int,
    dtype: torch.dtype,
    vocab_size: int,
    device: torch.device,
) -> list[str]:
    """Run every warm-up case once on `device` (after the graph captures); returns the names of the cases run.
    Every rank that computes logits must call it (the LM head gathers over the TP ranks)."""
    t0 = time.perf_counter()
    done, seconds = [], []
    for case in warmup_cases():
        t = time.perf_counter()
        run_case(case, compute_logits, sampler, hidden_size, dtype, vocab_size, device)
        if device.type == "cuda":  # each case's own time: which first launches (lazy CUDA modules) cost the start
            torch.cuda.synchronize(device)
        done.append(case.name)
        seconds.append(time.perf_counter() - t)
    slowest = sorted(zip(seconds, done), reverse=True)[:4]
    logger.info("sampling paths warmed up in %.2f s (%d cases; slowest %s)", time.perf_counter() - t0, len(done),
                ", ".join(f"{name} {s:.2f}" for s, name in slowest))
    return done
