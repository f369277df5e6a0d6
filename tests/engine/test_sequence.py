"""Sequence: token counts and the incrementally kept token array."""

from __future__ import annotations

import numpy as np

from meshserve.engine.sequence import Sequence
from meshserve.sampling import SamplingParams


def _seq(prompt):
    return Sequence(seq_id="s", request_id="s", index=0, prompt_token_ids=list(prompt), params=SamplingParams(),
                    max_tokens=1000)


def test_token_array_follows_appends_and_growth():
    seq = _seq(range(5))
    assert seq.token_array().tolist() == [0, 1, 2, 3, 4]
    for t in range(100, 300):  # past the first buffer (64): it grows, keeping what it holds
        seq.output_token_ids.append(t)
        if t % 7 == 0:
            arr = seq.token_array()
            assert arr.dtype == np.int64 and arr.tolist() == seq.all_token_ids
    seq.output_token_ids += [1, 2, 3]  # several at once (accepted proposals)
    assert seq.token_array().tolist() == seq.all_token_ids


def test_token_array_leaves_out_pending_tokens():
    seq = _seq([7, 8])
    seq.num_pending_tokens = 2  # sampled by a step still on the device: unknown here
    assert seq.token_array().tolist() == [7, 8]
    seq.output_token_ids.append(9)
    seq.num_pending_tokens = 1
    assert seq.token_array().tolist() == [7, 8, 9]
