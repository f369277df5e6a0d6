"""The start-up warm-up of the sampling paths (engine/sampling_warmup.py) reaches every path a request can
take, with the real Sampler and StepSampler masks, and leaves the Sampler's inputs well formed."""

from __future__ import annotations

import torch

from meshserve.engine.sampling_warmup import warm_up_sampling, warmup_cases
from meshserve.layers.sampler import Sampler, _temperature_only

HIDDEN, VOCAB = 16, 100


class RecordingSampler(Sampler):
    """The torch Sampler, keeping each batch's SamplingMetadata."""

    def __init__(self):
        super().__init__(fused=False)
        self.seen = []

    def forward(self, logits, metadata):
        self.seen.append(metadata)
        out = super().forward(logits, metadata)
        assert out.sampled_token_ids.shape == (logits.shape[0],)
        return out


def _run(monkeypatch):
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    calls = {"logits_rows": [], "bitmask_rows": []}

    def compute_logits(h):
        calls["logits_rows"].append(h.shape[0])
        return head(h)

    from meshserve.engine import step_sampler

    real = step_sampler.apply_bitmask

    def apply_bitmask(logits, bitmask):
        calls["bitmask_rows"].append(bitmask.shape[0])
        assert bitmask.shape == (logits.shape[0], -(-VOCAB // 32)) and bitmask.dtype == torch.int32
        real(logits, bitmask)
        assert torch.isfinite(logits).all()  # every token allowed: nothing masked

    monkeypatch.setattr(step_sampler, "apply_bitmask", apply_bitmask)
    sampler = RecordingSampler()
    with torch.no_grad():
        done = warm_up_sampling(compute_logits, sampler, HIDDEN, torch.float32, VOCAB, torch.device("cpu"))
    return done, sampler.seen, calls


def test_warm_up_runs_every_case(monkeypatch):
    done, _, calls = _run(monkeypatch)
    assert done == [c.name for c in warmup_cases()]
    assert 1 in calls["logits_rows"]  # the LM head's batch-1 GEMV
    # the grammar masks' kernel leaves its row count unspecialized (tests/kernels/test_triton_token_bitmask.py):
    # one batch reaches it
    assert calls["bitmask_rows"] == [3]


def test_warm_up_reaches_every_sampler_branch(monkeypatch):
    _, seen, _ = _run(monkeypatch)
    branches = {
        "fused temperature-only": any(not m.all_greedy and _temperature_only(m) for m in seen),
        "all greedy through the sampler": any(m.all_greedy for m in seen),
        "greedy rows beside random ones": any(not m.all_greedy and not m.all_random for m in seen),
        "top-k only": any(not m.no_top_k and m.no_top_p for m in seen),
        "top-p only": any(m.no_top_k and not m.no_top_p for m in seen),
        "top-k and top-p": any(not m.no_top_k and not m.no_top_p for m in seen),
        "min-p": any(not m.no_min_p for m in seen),
        "penalties": any(not m.no_penalties and m.prompt_token_ids is not None for m in seen),
        "logprobs": any(m.max_num_logprobs for m in seen),
        "seeded generators": any(m.generators for m in seen),
        "logit bias": any(m.logit_bias for m in seen),
        "banned ids": any(m.banned_token_ids for m in seen),
    }
    assert all(branches.values()), [k for k, v in branches.items() if not v]


def test_warm_up_through_a_real_runner(tiny_model_dir):
    """The runner's own LM head and Sampler (CPU: the torch paths; the masks by the torch reference, or by
    xgrammar's CPU kernel where another test imported xgrammar)."""
    from meshserve import LLM

    llm = LLM(
        model=tiny_model_dir("llama"), max_model_len=64, max_num_seqs=4, num_gpu_blocks_override=32, seed=0
    )
    try:
        runner = llm.engine.runner
        hidden = runner.config.model_config.hf_config.hidden_size
        done = warm_up_sampling(
            runner.model.compute_logits,
            runner.sampling.sampler,
            hidden,
            runner.dtype,
            runner.vocab_size,
            runner.device,
        )
        assert done == [c.name for c in warmup_cases()]
    finally:
        llm.shutdown()
