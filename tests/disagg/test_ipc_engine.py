"""test_disagg_engine.py's tests over the ipc connector: prefill on one engine, decode on another (separate
processes on one host, the producer's CPU pool in shared memory and mapped by the consumer): a single engine's
tokens, byte-identical blocks, every block freed on both sides, a transfer nobody holds failing cleanly, held
blocks nobody reads freed after the hold timeout."""

from __future__ import annotations

import pytest

# collected here, over this module's pair, in test_disagg_engine's order (the first counts every transfer)
from tests.disagg.test_disagg_engine import engine_pair
from tests.disagg.test_disagg_engine import (  # noqa: F401, I001
    test_tokens_match_a_single_engine_and_blocks_are_freed,
)
from tests.disagg.test_disagg_engine import (  # noqa: F401, I001
    test_a_transfer_nobody_holds_fails_cleanly_and_frees_its_blocks,
)
from tests.disagg.test_disagg_engine import (  # noqa: F401, I001
    test_blocks_are_byte_identical,
)
from tests.disagg.test_disagg_engine import (  # noqa: F401, I001
    test_held_blocks_nobody_pulls_are_freed_after_the_hold_timeout,
)


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    yield from engine_pair(tiny_model_dir, "ipc")


def test_the_pair_moves_kv_over_ipc(pair):
    connector = pair[3].disagg.connector
    assert connector.name == "ipc" and connector.one_sided_read
    assert all(t.is_shared() for t in connector.kv_tensors)  # its own pool too (kv_both reads)
    [(watch, mapped)] = connector._peers.values()  # the producer's pool, mapped from its process
    assert watch.pid != __import__("os").getpid() and watch.alive() and all(t.is_shared() for t in mapped)
