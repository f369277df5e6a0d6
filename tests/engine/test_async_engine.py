"""AsyncLLM: ending every request in flight at once (a server's drain that ran out of time)."""

from __future__ import annotations

import asyncio

from meshserve import SamplingParams
from meshserve.config import EngineArgs
from meshserve.engine.async_engine import AsyncLLM
from meshserve.errors import ServerDrainingError
from tests.serve.conftest import wait_idle


def test_fail_in_flight_ends_each_request_and_frees_its_blocks(tiny_model_dir):
    allm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model_dir("llama"), max_model_len=256, max_num_seqs=2))
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def consume(i: int) -> int:  # the tokens it got (outputs are cumulative)
        n = 0
        async for out in allm.generate({"prompt_token_ids": [5, 6, 7 + i]}, params):
            n = len(out.outputs[0].token_ids)
        return n

    async def scenario():
        # 4 requests, 2 running (their blocks held) and 2 waiting, when the error comes
        tasks = [asyncio.create_task(consume(i)) for i in range(4)]
        while allm.engine.stats()["num_running"] < 2:
            await asyncio.sleep(0.01)
        allm.fail_in_flight(ServerDrainingError("the drain timeout passed"))
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(scenario())
        assert all(isinstance(r, ServerDrainingError) for r in results), results
        stats = wait_idle(allm)  # the core aborted them: nothing runs or waits, every block is free
        assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0.0
        assert asyncio.run(consume(0)) == 200  # and the engine goes on serving
    finally:
        allm.shutdown()
