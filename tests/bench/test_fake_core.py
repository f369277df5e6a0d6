"""FakeEngineCore sheds queued requests that can no longer start before their TTFT target, as the real core does."""

import time

from meshserve.bench.fake_core import FakeEngineCore
from meshserve.engine.messages import CoreInfo, EngineCoreRequest, error_from_message
from meshserve.sampling import SamplingParams

INFO = CoreInfo(model="fake", max_model_len=256, vocab_size=1000, block_size=16, num_blocks=64,
                max_num_batched_tokens=256, enable_chunked_prefill=True, slo_ttft_s=0.5)


def _request(rid: str, waited_s: float = 0.0, slo_ttft_s: float | None = None) -> EngineCoreRequest:
    return EngineCoreRequest(rid, [5, 6, 7], SamplingParams(max_tokens=100), 100,
                             arrival_time=time.monotonic() - waited_s, slo_ttft_s=slo_ttft_s)


def _step(core: FakeEngineCore) -> dict[str, str]:
    """One step; the shed requests' error codes by request id."""
    return {e.request_id: error_from_message(e).code for e in core.step().errors}


def test_a_queued_request_past_its_target_is_shed_with_slo_shed():
    core = FakeEngineCore(INFO, step_s=0.001, max_num_seqs=1)
    for r in (_request("runs"), _request("waits"), _request("too-late", waited_s=0.6),
              _request("own-target", waited_s=0.6, slo_ttft_s=60.0)):
        core.add_request_or_report(r)
    # "waits" starts once "runs" ends (100 steps of 1 ms: within 0.5 s); "too-late" waited 0.6 s already;
    # "own-target" too, but its own target is 60 s
    assert _step(core) == {"too-late": "slo_shed"}
    assert list(core.running) == ["runs"] and [r.request_id for r in core.waiting] == ["waits", "own-target"]
    assert core.num_shed == 1


def test_a_request_that_would_start_too_late_is_shed_before_it_waits():
    core = FakeEngineCore(INFO, step_s=0.01, max_num_seqs=1)  # "runs" holds the slot for 100 x 10 ms = 1 s
    core.add_request_or_report(_request("runs"))
    _step(core)
    core.add_request_or_report(_request("queued"))
    assert _step(core) == {"queued": "slo_shed"}


def test_without_shed_late_nothing_is_dropped():
    core = FakeEngineCore(INFO, step_s=0.001, max_num_seqs=1, shed_late=False)
    for r in (_request("runs"), _request("too-late", waited_s=0.6)):
        core.add_request_or_report(r)
    assert _step(core) == {} and [r.request_id for r in core.waiting] == ["too-late"]
