"""test_disagg_engine.py's tests over the nixl connector: prefill on one engine, decode on another (separate
processes, NIXL/UCX on loopback): a single engine's tokens, byte-identical blocks, every block freed on both
sides, a transfer nobody holds failing cleanly, held blocks nobody reads freed after the hold timeout."""

from __future__ import annotations

import pytest

from meshserve.disagg.nixl_connector import nixl_available

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

pytestmark = pytest.mark.skipif(
    not nixl_available(), reason="the NIXL library is not installed (pip install meshserve[nixl])"
)


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    yield from engine_pair(tiny_model_dir, "nixl")


def test_the_pair_moves_kv_over_nixl(pair):
    consumer = pair[3]
    assert consumer.disagg.connector.name == "nixl" and consumer.disagg.connector.one_sided_read
