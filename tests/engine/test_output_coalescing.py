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


def test_folding_a_long_pile_copies_each_token_once():
    # a client that stops reading lets thousands of outputs pile up; rebuilding the accumulated lists at each fold
    # copied O(k^2) items for k outputs (20K: 1.3 s on the event loop). They grow in place: each fold copies its own.
    acc = _delta([0], "t", logprobs=[{0: 0.0}])
    acc.outputs[0].step_times = [0.0]
    (c,) = acc.outputs
    grown = (c.token_ids, c.logprobs, c.step_times)
    for i in range(1, 2000):
        new = _delta([i], "t", logprobs=[{i: 0.0}])
        new.outputs[0].step_times = [float(i)]
        acc = fold_outputs(acc, new, RequestOutputKind.DELTA)
    (c,) = acc.outputs
    assert all(now is before for now, before in zip((c.token_ids, c.logprobs, c.step_times), grown))
    assert c.token_ids == list(range(2000)) and c.step_times == [float(i) for i in range(2000)]
    assert c.logprobs == [{i: 0.0} for i in range(2000)] and c.text == "t" * 2000
