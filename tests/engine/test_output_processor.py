"""The front end's output side: stop strings end requests in the core within one step; output kinds agree."""

from __future__ import annotations

import asyncio

import pytest

from meshserve.config import EngineArgs
from meshserve.engine.async_engine import AsyncLLM
from meshserve.engine.llm_engine import LLMEngine
from meshserve.sampling import RequestOutputKind, SamplingParams

PROMPT = "The capital of France"


@pytest.fixture(scope="module", params=[True, False], ids=["async-sched", "sync-sched"])
def engine(request, tiny_model_dir):
    e = LLMEngine.from_engine_args(EngineArgs(model=tiny_model_dir("llama"), block_size=4, max_model_len=256,
                                              async_scheduling=request.param))
    yield e
    e.shutdown()


def _run(engine: LLMEngine, rid: str, params: SamplingParams) -> list:
    engine.add_request(rid, PROMPT, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_stop_string_stops_the_core_within_one_step(engine):
    free = _run(engine, "free", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[-1].outputs[0]
    stop = free.text[3:6]
    engine.add_request("s", PROMPT, SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))
    steps = 0
    while True:
        steps += 1
        outs = engine.step()
        if outs and outs[-1].finished:
            break
    assert outs[-1].outputs[0].stop_reason == stop and outs[-1].outputs[0].text == free.text[:3]
    # the front end found the stop string; the core was told in the same step and has let the request go
    assert "s" not in engine.core.requests and "s" not in engine.scheduler.seqs
    assert len(outs[-1].outputs[0].token_ids) < len(free.token_ids)
    engine.step()  # a step already launched for it (async scheduling) drops its token
    assert engine.scheduler.block_manager.usage == 0.0


def test_output_kinds_agree(engine):
    base = dict(temperature=0.9, seed=5, max_tokens=12, n=2, logprobs=1, ignore_eos=True)
    cumulative = _run(engine, "c", SamplingParams(**base))
    delta = _run(engine, "d", SamplingParams(**base, output_kind=RequestOutputKind.DELTA))
    final = _run(engine, "f", SamplingParams(**base, output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(final) == 1 and final[0].finished and len(cumulative) == len(delta) > 1
    for i in range(2):
        want = cumulative[-1].outputs[i]
        assert final[0].outputs[i].text == want.text and final[0].outputs[i].token_ids == want.token_ids
        parts = [c for out in delta for c in out.outputs if c.index == i]
        assert "".join(c.text for c in parts) == want.text
        assert [t for c in parts for t in c.token_ids] == want.token_ids
        assert [lp for c in parts for lp in c.logprobs] == want.logprobs


def test_async_front_end_aborts_the_core_on_a_stop_string(tiny_model_dir):
    allm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model_dir("llama"), block_size=4, max_model_len=256))

    async def main():
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        free = [o async for o in allm.generate(PROMPT, params, "free")][-1].outputs[0]
        stop = free.text[3:6]
        params = SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True)
        last = [o async for o in allm.generate(PROMPT, params, "s")][-1].outputs[0]
        assert last.stop_reason == stop and last.text == free.text[:3]
        # the abort went to the core before this call: the core has let the request go
        assert not await allm.call(lambda: "s" in allm.engine.requests)

    try:
        asyncio.run(main())
    finally:
        allm.shutdown()


@pytest.mark.parametrize("steps", [[[5], [6], [7], [8], [2]], [[5], [6, 7], [8, 2]], [[5, 6, 7, 8, 2]]],
                         ids=["one-a-step", "accepted-runs", "one-step"])
def test_tokens_before_a_stop_token_in_its_step_are_text(steps, tiny_model_dir):
    """A verify step's accepted proposals arrive with the stop token that ends the run: only that token is
    left out of the text (the feature-combination fuzz found the tokens before it dropped as well)."""
    from transformers import AutoTokenizer

    from meshserve.engine.input_processor import ProcessedRequest
    from meshserve.engine.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
    from meshserve.engine.output_processor import OutputProcessor

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(temperature=0, stop_token_ids=[2])
    core = EngineCoreRequest("r", [40, 41], params, max_tokens=16)
    processor.add_request(ProcessedRequest("r", None, [40, 41], params, 0.0, [core]))
    for i, ids in enumerate(steps):
        last = i == len(steps) - 1
        done = processor.process_outputs(EngineCoreOutputs([EngineCoreOutput(
            "r", ids, "stop" if last else None, 2 if last else None)])).request_outputs
    (completion,) = done[-1].outputs
    assert completion.token_ids == [5, 6, 7, 8, 2] and completion.stop_reason == 2
    assert completion.text == tokenizer.decode([5, 6, 7, 8]) != ""


def _incomplete_char_token(tokenizer) -> int:
    """A token that is the first byte of a multi-byte UTF-8 character (decodes to U+FFFD on its own)."""
    return next(t for t in range(3, tokenizer.vocab_size) if tokenizer.decode([t]) == "\ufffd")


@pytest.mark.parametrize("include", [False, True], ids=["cut", "included"])
@pytest.mark.parametrize("last", ["text", "withheld-bytes"])
def test_a_stop_string_in_the_last_step_is_the_finish_reason(last, include, tiny_model_dir):
    """The step that reaches max_tokens completes a stop string (in its text, or in the withheld bytes flushed
    at the end): the text is cut there and the completion says so, finish_reason "stop" and the string as
    stop_reason, as in vLLM (the API differential fuzz found the text cut under finish_reason "length")."""
    from transformers import AutoTokenizer

    from meshserve.engine.input_processor import ProcessedRequest
    from meshserve.engine.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
    from meshserve.engine.output_processor import OutputProcessor

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    final = _incomplete_char_token(tokenizer) if last == "withheld-bytes" else 40
    stop = tokenizer.decode([final])
    assert stop not in tokenizer.decode([5])
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(temperature=0, max_tokens=2, stop=[stop], include_stop_str_in_output=include)
    core = EngineCoreRequest("r", [50, 51], params, max_tokens=2)
    processor.add_request(ProcessedRequest("r", None, [50, 51], params, 0.0, [core]))
    processor.process_outputs(EngineCoreOutputs([EngineCoreOutput("r", [5], None, None)]))
    done = processor.process_outputs(EngineCoreOutputs([EngineCoreOutput("r", [final], "length", None)]))
    (completion,) = done.request_outputs[-1].outputs
    assert completion.token_ids == [5, final]
    assert completion.text == tokenizer.decode([5]) + (stop if include else "")
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)


def test_a_producers_handle_reaches_the_request_output():
    """A prefill leg's final core output names its held KV (kv_transfer_params): the RequestOutput carries it, as
    vLLM's does, for the server's answer; the msgpack line between core and front end keeps it."""
    import msgspec

    from meshserve.engine.input_processor import ProcessedRequest
    from meshserve.engine.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
    from meshserve.engine.output_processor import OutputProcessor

    processor = OutputProcessor(None)
    params = SamplingParams(temperature=0, max_tokens=1)
    core = EngineCoreRequest("r", [50, 51], params, max_tokens=1)
    processor.add_request(ProcessedRequest("r", None, [50, 51], params, 0.0, [core]))
    handle = {"transfer_id": "t", "remote_rank": 0, "remote_block_ids": [4, 9]}
    sent = EngineCoreOutputs([EngineCoreOutput("r", [7], "length", kv_transfer_params=handle)])
    received = msgspec.msgpack.decode(msgspec.msgpack.encode(sent), type=EngineCoreOutputs)
    (out,) = processor.process_outputs(received).request_outputs
    assert out.finished and out.kv_transfer_params == handle


def test_delta_outputs_carry_the_core_s_step_times_once():
    """Each DELTA output names the core's time of each step that gave its tokens (one a step, however many
    tokens), and no step twice: the server times inter-token latency from them, as vLLM does."""
    from meshserve.engine.input_processor import ProcessedRequest
    from meshserve.engine.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
    from meshserve.engine.output_processor import OutputProcessor

    processor = OutputProcessor(None)
    params = SamplingParams(temperature=0, max_tokens=4, output_kind=RequestOutputKind.DELTA)
    processor.add_request(ProcessedRequest("r", None, [50, 51], params, 0.0,
                                           [EngineCoreRequest("r", [50, 51], params, max_tokens=4)]))

    def step(out: EngineCoreOutput, timestamp: float):
        (request_output,) = processor.process_outputs(EngineCoreOutputs([out], timestamp=timestamp)).request_outputs
        return request_output

    first, second = step(EngineCoreOutput("r", [7]), 5.0), step(EngineCoreOutput("r", [8, 9]), 5.25)
    done = step(EngineCoreOutput("r", [], "length"), 5.5)
    assert [first.outputs[0].step_times, second.outputs[0].step_times, done.outputs[0].step_times] == [
        [5.0], [5.25], []]
