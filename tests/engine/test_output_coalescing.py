"""Outputs that piled up for a lagging caller fold into one, every token kept in order."""

import asyncio

from meshserve.engine.output_coalescing import fold_outputs
from meshserve.outputs import CompletionOutput, RequestOutput
from meshserve.sampling import RequestOutputKind, SamplingParams


def _delta(tokens, text, finish=None, index=0, logprobs=None):
    return RequestOutput("r", None, [1, 2], [CompletionOutput(index, text, list(tokens), logprobs=logprobs,
                                                               finish_reason=finish)], finish is not None)


def test_delta_outputs_concatenate_and_take_the_last_finish():
    acc = _delta([5], "a", logprobs=[{5: 0.1}])
    acc = fold_outputs(acc, _delta([6, 7], "bc", logprobs=[{6: 0.2}, {7: 0.3}]), RequestOutputKind.DELTA)
    acc = fold_outputs(acc, _delta([8], "d", finish="length", logprobs=[{8: 0.4}]), RequestOutputKind.DELTA)
    (c,) = acc.outputs
    assert (c.token_ids, c.text, c.finish_reason, acc.finished) == ([5, 6, 7, 8], "abcd", "length", True)
    assert c.logprobs == [{5: 0.1}, {6: 0.2}, {7: 0.3}, {8: 0.4}]


def test_choices_of_n_fold_by_index_and_cumulative_outputs_are_superseded():
    acc = fold_outputs(_delta([5], "a", index=0), _delta([9], "z", index=1), RequestOutputKind.DELTA)
    acc = fold_outputs(acc, _delta([6], "b", index=0), RequestOutputKind.DELTA)
    assert {c.index: c.text for c in acc.outputs} == {0: "ab", 1: "z"}
    later = _delta([5, 6], "ab")
    assert fold_outputs(_delta([5], "a"), later, RequestOutputKind.CUMULATIVE) is later


def test_a_lagging_stream_gets_fewer_outputs_and_every_token():
    from meshserve.bench.fake_core import FakeEngineCore
    from meshserve.engine.async_engine import AsyncLLM
    from meshserve.engine.core_client import ThreadedCoreClient
    from meshserve.engine.messages import CoreInfo

    info = CoreInfo(model="fake", max_model_len=128, vocab_size=1000, block_size=16, num_blocks=64,
                    max_num_batched_tokens=128, enable_chunked_prefill=True)
    allm = AsyncLLM(ThreadedCoreClient(FakeEngineCore(info, step_s=0.005)))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def consume(lag_s: float) -> list[list[int]]:
        chunks = []
        async for out in allm.generate({"prompt_token_ids": [3, 4, 5]}, params):
            chunks.append(out.outputs[0].token_ids)
            await asyncio.sleep(lag_s)
        return chunks

    try:
        prompt_steps = asyncio.run(consume(0.0))
        lagging = asyncio.run(consume(0.03))
    finally:
        allm.shutdown()
    assert sum(map(len, prompt_steps)) == sum(map(len, lagging)) == 24
    assert len(lagging) < len(prompt_steps) and max(map(len, lagging)) > 1


def test_folded_outputs_keep_each_step_s_time():
    first, second = _delta([5], "a"), _delta([6, 7], "bc")
    first.outputs[0].step_times, second.outputs[0].step_times = [1.0], [1.1]
    (c,) = fold_outputs(first, second, RequestOutputKind.DELTA).outputs
    assert c.step_times == [1.0, 1.1]
