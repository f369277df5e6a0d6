"""The speculator's proposals per step: none while the gate has speculation off (but on its probe steps and
for seeded requests), and from each sequence's incremental n-gram index, caught up after steps without."""

from __future__ import annotations

from meshserve import SamplingParams
from meshserve.engine.runner_output import ModelRunnerOutput
from meshserve.engine.scheduler_output import SchedulerOutput
from meshserve.engine.sequence import Sequence, SequenceStatus
from meshserve.spec_decode.config import SpeculativeConfig
from meshserve.spec_decode.ngram_proposer import NgramProposer
from meshserve.spec_decode.speculator import Speculator, speculation_allowed


def _seq(seq_id: str, seed: int | None = None) -> Sequence:
    seq = Sequence(seq_id=seq_id, request_id=seq_id, index=0, prompt_token_ids=[1, 2, 3, 4, 1, 2, 3, 4, 1],
                   params=SamplingParams(seed=seed), max_tokens=100)
    seq.status = SequenceStatus.RUNNING
    return seq


def test_no_proposals_while_the_gate_is_off_except_probes_and_seeded():
    spec = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=2, prompt_lookup_min=1,
                                        prompt_lookup_max=3))
    spec.gate.pays = lambda batch, context_tokens: False  # acceptance does not pay at this batch
    calls: list[str] = []
    propose_for = spec.proposer.propose_for
    spec.proposer.propose_for = lambda seq, skip=0: calls.append(seq.seq_id) or propose_for(seq, skip)
    plain, seeded = _seq("plain"), _seq("seeded", seed=7)
    probes = []
    for step in range(1, 3 * spec.gate.probe_every + 1):
        for seq in (plain, seeded):
            seq.output_token_ids.append([2, 3, 4, 1][step % 4])
        calls.clear()
        spec.after_step(SchedulerOutput(scheduled=[]), ModelRunnerOutput(), [plain, seeded], num_running=2)
        assert "seeded" in calls  # the gate spares seeded requests
        if "plain" in calls:
            probes.append(step)
            expected = NgramProposer(2, 1, 3, use_index=False).propose_for(plain)
            assert plain.spec_token_ids == expected and expected  # the index caught up with 15 steps' tokens
        else:
            assert plain.spec_token_ids == []
    # the second probe twice as far from the first (the first found speculation still does not pay)
    assert probes == [spec.gate.probe_every, 3 * spec.gate.probe_every]


def test_token_masks_decode_one_token_per_step():
    """Verification samples without the sampler's masks: allowed ids and bad words turn speculation off."""
    assert speculation_allowed(_seq("plain"))
    allowed = _seq("allowed")
    allowed.params = SamplingParams(allowed_token_ids=[1, 2])
    bad = _seq("bad")
    bad.params = SamplingParams(bad_words=["x"])
    bad.params._bad_words_token_ids = [[5]]  # as the input processor fills it
    assert not speculation_allowed(allowed) and not speculation_allowed(bad)
