"""The consumer's coordinator on a failed pull: the receiving blocks are freed, or retired when the transport
says a read it could not cancel may still write them (and the request fails cleanly either way)."""

from __future__ import annotations

import pytest

from meshserve.disagg.connector import TransferEvent
from meshserve.disagg.coordinator import KVTransferCoordinator
from meshserve.disagg.stats import KVTransferStats
from meshserve.engine.block_manager import BlockManager
from meshserve.engine.sequence import Sequence
from meshserve.sampling import SamplingParams


def _receiving_coordinator() -> tuple[KVTransferCoordinator, BlockManager, Sequence]:
    bm = BlockManager(8, 4)
    seq = Sequence(seq_id="r", request_id="r", index=0, prompt_token_ids=list(range(10)),
                   params=SamplingParams(max_tokens=4), max_tokens=4)
    assert bm.allocate(seq, 10, [])
    co = KVTransferCoordinator.__new__(KVTransferCoordinator)  # only the consumer's receiving side is used
    co.block_manager, co.stats, co._cancelled, co._errors = bm, KVTransferStats(), set(), []
    co._receiving, co._pulling = {"r": seq}, {"t"}
    co.stats.receiving_blocks = 3
    return co, bm, seq


@pytest.mark.parametrize("retire", [False, True])
def test_a_failed_pull_frees_or_retires_its_blocks_and_fails_the_request(retire):
    co, bm, seq = _receiving_coordinator()
    assert co._apply(TransferEvent("failed", "t", "r", reason="read timed out", retire_blocks=retire)) is None
    assert bm.num_free_blocks == (5 if retire else 8) and bm.num_retired_blocks == (3 if retire else 0)
    assert len(co._errors) == 1 and co.stats.failed == 1 and co.stats.receiving_blocks == 0
    assert not co._pulling  # the transfer id may be pulled again
