"""An executor with the model removed: the real batch preparation, then instant 'sampled' tokens.

Used by the host-side benchmarks (`bench host`, `bench channel`) to measure what every step costs on the CPU.
"""

from __future__ import annotations

import random
import time


class NoModelExecutor:
    """Builds the runner's real flat batch, then samples token_id (or, without one, random ids in [100, 20000),
    with top-k logprobs when logprobs_k is set) for every sequence that samples."""

    supports_async_scheduling = False

    def __init__(self, runner, token_id: int | None = 17, logprobs_k: int | None = None, seed: int = 1):
        self.runner = runner
        self.token_id = token_id
        self.logprobs_k = logprobs_k
        self.rng = random.Random(seed)
        self.prepare_s = 0.0

    def execute(self, sched_out):
        from meshserve.engine.model_runner import ModelRunnerOutput, TokenLogprobs

        out = ModelRunnerOutput()
        if sched_out.is_empty:
            return out
        t = time.perf_counter()
        self.runner._prepare(sched_out.scheduled)
        self.prepare_s += time.perf_counter() - t
        rnd, k = self.rng.randrange, self.logprobs_k
        for s in sched_out.scheduled:
            if not s.do_sample:
                continue
            tok = self.token_id if self.token_id is not None else rnd(100, 20000)
            out.sampled[s.seq_id] = tok
            if k:
                lps = sorted((-self.rng.random() * 5 for _ in range(k)), reverse=True)
                out.logprobs[s.seq_id] = TokenLogprobs(tok, lps[0], 1, [tok] + [rnd(100, 20000) for _ in range(k - 1)],
                                                       lps)
        return out

    def shutdown(self) -> None:
        pass
