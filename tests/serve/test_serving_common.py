"""collect_outputs (the whole, not streamed, answer of completions and chat): each prompt's deltas folded in
order, every step counted, and a failed or cancelled request counted as such."""

from __future__ import annotations

import asyncio

import pytest

from meshserve.outputs import CompletionOutput, RequestOutput
from meshserve.serve.engine_client import EngineRequest
from meshserve.serve.metrics import ServerMetrics
from meshserve.serve.serving_common import collect_outputs


def _delta(rid: str, tokens: list[int], finish: str | None = None) -> RequestOutput:
    choice = CompletionOutput(index=0, text="".join(f"<{t}>" for t in tokens), token_ids=tokens,
                              finish_reason=finish)
    return RequestOutput(request_id=rid, prompt=None, prompt_token_ids=[1, 2, 3], outputs=[choice],
                         finished=finish is not None)


def _request(rid: str, deltas: list[RequestOutput], fail: BaseException | None = None) -> EngineRequest:
    async def rest():
        for d in deltas[1:]:
            await asyncio.sleep(0)
            yield d
        if fail is not None:
            raise fail

    return EngineRequest(rest(), deltas[0])


ENGINE_0 = {"model_name": "meshserve", "engine": "0"}  # vLLM's labels of a default server's one engine


def _count(metrics: ServerMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_each_prompt_whole_in_order_and_every_token_counted():
    metrics = ServerMetrics()
    tracker = metrics.track()
    requests = [_request("a", [_delta("a", [5]), _delta("a", [6, 7]), _delta("a", [8], "length")]),
                _request("b", [_delta("b", [9]), _delta("b", [10], "stop")])]
    outputs = asyncio.run(collect_outputs(requests, tracker))
    assert [o.request_id for o in outputs] == ["a", "b"]
    assert [o.outputs[0].token_ids for o in outputs] == [[5, 6, 7, 8], [9, 10]]
    assert outputs[0].outputs[0].text == "<5><6><7><8>" and outputs[1].outputs[0].finish_reason == "stop"
    assert _count(metrics, "vllm:generation_tokens_total", **ENGINE_0) == 6
    assert _count(metrics, "vllm:prompt_tokens_total", **ENGINE_0) == 6  # each prompt once
    # the outcome is the caller's to count (once its requests are closed)
    outcomes = ("stop", "length", "error")
    assert sum(_count(metrics, "meshserve:requests_total", outcome=o) for o in outcomes) == 0


@pytest.mark.parametrize("fail, outcome", [(RuntimeError("engine failed"), "error"),
                                           (asyncio.CancelledError(), "abort")])
def test_a_failed_or_cancelled_request_is_counted_and_raised(fail, outcome):
    metrics = ServerMetrics()
    requests = [_request("a", [_delta("a", [5]), _delta("a", [6])], fail=fail)]
    with pytest.raises(type(fail)):
        asyncio.run(collect_outputs(requests, metrics.track()))
    assert _count(metrics, "meshserve:requests_total", outcome=outcome) == 1
