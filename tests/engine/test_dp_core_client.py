"""DPCoreClient: requests spread over data-parallel cores, aborts reach the right one, a dead core fails only
its own requests; merge_stats: the server's counters from each core's."""

from __future__ import annotations

import os
import signal

import pytest

from meshserve.bench.fake_core import fake_core_factory
from meshserve.config import EngineArgs
from meshserve.engine.core_client import EngineCoreClient
from meshserve.engine.dp_core_client import DPCoreClient, spawn_dp_cores
from meshserve.engine.dp_stats import merge_stats
from meshserve.engine.messages import EngineCoreRequest, SchedulerStats
from meshserve.errors import EngineDeadError
from meshserve.sampling import SamplingParams
from tests.engine.core_outputs import collect_outputs, finished_ids


def _request(rid: str, max_tokens: int) -> EngineCoreRequest:
    return EngineCoreRequest(
        rid, [5, 6, 7], SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens
    )


def _start(model_dir: str, n: int = 2) -> DPCoreClient:
    args = EngineArgs(model=model_dir, device="cpu", max_model_len=512)
    return DPCoreClient.from_core_processes(args, spawn_dp_cores(args, n, fake_core_factory(0.005)))


@pytest.fixture(scope="module")
def dp(tiny_model_dir):
    client = _start(tiny_model_dir("llama"))
    yield client
    procs = [c.proc for c in client.clients]
    client.shutdown()
    assert not client.is_alive() and not any(p.is_alive() for p in procs)


def test_requests_spread_evenly_and_stats_add_up(dp):
    assert isinstance(dp, EngineCoreClient) and dp.num_cores == 2
    before = list(dp.num_requests)
    ids = [f"even-{i}" for i in range(10)]
    for rid in ids:
        dp.add_request(_request(rid, 3))
    got = collect_outputs(dp, lambda g: finished_ids(g) >= set(ids))
    assert [a - b for a, b in zip(dp.num_requests, before)] == [5, 5]  # nothing finished before all were sent
    tokens = {
        rid: sum(len(o.new_token_ids) for m in got for o in m.outputs if o.request_id == rid) for rid in ids
    }
    assert tokens == dict.fromkeys(ids, 3)
    # every message carries the merged counters: the last one counts both cores' tokens and blocks
    assert got[-1].stats.generation_tokens == 30 and got[-1].stats.num_running == 0
    assert got[-1].stats.num_blocks == 2 * dp.info.num_blocks
    assert dp._outstanding == [0, 0] and not dp._core_of


def test_abort_reaches_the_core_that_holds_the_request(dp):
    dp.add_request(_request("long", 400))
    core = dp._core_of["long"]
    collect_outputs(dp, lambda g: any(o.request_id == "long" for m in g for o in m.outputs))
    assert dp._stats[core].num_running == 1
    dp.abort_requests(["long", "never-sent"])
    assert dp._outstanding[core] == 0
    collect_outputs(dp, lambda g: dp._stats[core].num_running == 0)


def test_merge_stats_adds_counts_and_predicts_from_the_target_core():
    a = SchedulerStats(
        num_running=3,
        num_waiting=1,
        kv_cache_usage=0.5,
        num_blocks=100,
        prefix_cache_queries=10,
        prefix_cache_hits=5,
        generation_tokens=7,
        queue_wait_s=0.2,
        prefill_s_per_token=1e-4,
        step_time_actual_s=0.02,
        spec_num_accepted_tokens_per_pos=[1, 2],
    )
    b = SchedulerStats(
        num_running=1,
        kv_cache_usage=0.1,
        num_blocks=300,
        prefix_cache_queries=30,
        prefix_cache_hits=0,
        generation_tokens=5,
        queue_wait_s=0.9,
        prefill_s_per_token=3e-4,
        step_time_actual_s=0.04,
        spec_num_accepted_tokens_per_pos=[1, 1, 1],
    )
    m = merge_stats([a, b], target=1, expert_load=[[[1, 2]], [[3, 4]]])
    assert (m.num_running, m.num_waiting, m.num_blocks, m.generation_tokens) == (4, 1, 400, 12)
    assert m.kv_cache_usage == pytest.approx((0.5 * 100 + 0.1 * 300) / 400)
    assert m.prefix_cache_hit_rate == pytest.approx(5 / 40)
    assert (m.queue_wait_s, m.prefill_s_per_token) == (0.9, 3e-4)  # the core the next request goes to
    assert m.step_time_actual_s == pytest.approx(0.03)
    assert m.spec_num_accepted_tokens_per_pos == [2, 3, 1] and m.expert_load == [[4, 6]]
    assert merge_stats([a, b], target=None).queue_wait_s == 0.2  # no live core: the smallest prediction


def test_a_dead_core_fails_its_own_requests_and_the_other_runs_on(dp):
    """Last: it kills the module's cores."""
    dp.add_request(_request("a", 400))
    dp.add_request(_request("b", 30))
    lost_core = dp._core_of["a"]
    assert dp._core_of["b"] != lost_core
    collect_outputs(dp, lambda g: {o.request_id for m in g for o in m.outputs} >= {"a", "b"})
    os.kill(dp.clients[lost_core].proc.pid, signal.SIGKILL)
    got = collect_outputs(dp, lambda g: "b" in finished_ids(g) and any(m.errors for m in g))
    (err,) = [e for m in got for e in m.errors]
    assert err.request_id == "a" and err.error_type == "EngineDeadError"
    assert not dp.is_alive()  # /health: 503 from now on
    dp.add_request(_request("c", 2))  # the survivor still takes what is sent (AsyncLLM refuses first)
    assert dp._core_of["c"] != lost_core
    os.kill(dp.clients[1 - lost_core].proc.pid, signal.SIGKILL)
    with pytest.raises(EngineDeadError):
        collect_outputs(dp, lambda g: False, timeout=10)


def test_one_core_keeps_this_process_devices_without_counting_them(monkeypatch):
    """One core needs no split of the GPUs: the server's process must not import torch to count them before
    the core starts (it did, through visible_devices); two cores on four GPUs still get two each."""
    from meshserve.distributed import data_parallel
    from meshserve.engine.dp_core_client import core_devices

    args = EngineArgs(model="unused", device="cuda", tensor_parallel_size=2)
    monkeypatch.setattr(data_parallel, "visible_devices", lambda device: pytest.fail("counted the GPUs"))
    assert core_devices(args, 1) == [None]
    monkeypatch.setattr(data_parallel, "visible_devices", lambda device: ["0", "1", "2", "3"])
    assert core_devices(args, 2) == ["0,1", "2,3"]
