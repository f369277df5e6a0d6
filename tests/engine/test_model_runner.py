"""engine/model_runner.py: what its forward sets around the model (the parts testable without a model)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from meshserve.engine.model_runner import ModelRunner
from meshserve.kernels import pdl


def test_forward_runs_pdl_only_in_decode_only_steps():
    # every forward goes through ModelRunner.forward (eager steps, graph captures, warm-ups), so its mark decides
    # which launches a captured graph records: with PDL on, a step carrying prompt tokens launches plain
    seen = []
    runner = SimpleNamespace(model=lambda ids, pos, meta, inter: seen.append(pdl.resolve(None)) or meta)
    with pdl.enabled():
        for decode_only in (True, False, True):
            ModelRunner.forward(runner, None, None, SimpleNamespace(is_decode_only=decode_only))
        assert pdl.resolve(None)  # the mark ends with the forward
    with pdl.enabled(steps="all"):
        ModelRunner.forward(runner, None, None, SimpleNamespace(is_decode_only=False))
    assert seen == [True, False, True, True]
    # steps="one" (a large dense model's auto policy): one-row decode steps only, rows from the positions
    seen.clear()
    with pdl.enabled(steps="one"):
        for rows, decode_only in ((1, True), (2, True), (1, False), (None, True)):
            positions = None if rows is None else torch.zeros(rows, dtype=torch.long)
            ModelRunner.forward(runner, None, positions, SimpleNamespace(is_decode_only=decode_only))
    assert seen == [True, False, False, False]
