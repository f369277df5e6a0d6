"""A layer-wise producer request preempted mid-prefill (gloo pair, both engines in this process, stepped by
hand): its released blocks are reused by another request before a consumer subscribes. The subscription must
not be sent those blocks as the request's (they hold the other request's KV now): the consumer gets the
blocks of the recompute, byte for byte the producer's held ones, and the tokens of a single engine."""

from __future__ import annotations

import threading
import time

import torch

from meshserve.config import EngineArgs
from meshserve.engine.core import EngineCore
from meshserve.engine.messages import EngineCoreRequest
from meshserve.sampling import SamplingParams
from tests.disagg.engine_pair import free_port, transfer_config
from tests.disagg.test_disagg_engine import BLOCK, _ids, _run

CHUNK = 16  # the producer's token budget per step: the prompt takes three steps


def _params(key: str, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        temperature=0,
        max_tokens=max_tokens,
        ignore_eos=True,
        kv_transfer_params={key: True, "transfer_id": "t"},
    )


def _until(cond, what: str, step=lambda: None, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        step()


def test_a_subscription_after_a_preemption_gets_the_recomputed_blocks(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # (every engine here rounds alike: see test_layerwise_engine)
    port = free_port()
    # synchronous steps: each step's forward is done when step() returns, so the test orders every event
    common = {
        "model": tiny_model_dir("llama"), "block_size": BLOCK, "max_model_len": 256,
        "num_gpu_blocks_override": 64, "async_scheduling": False,
    }
    cfg = {"layerwise": True, "transfer_timeout_s": 10, "init_timeout_s": 120}
    built = {}

    def build_producer():  # (each side's start waits for the other: the producer starts in a thread)
        config = transfer_config("kv_producer", 0, port, hold_timeout_s=30, **cfg)
        built["p"] = EngineCore.from_engine_args(
            EngineArgs(**common, max_num_batched_tokens=CHUNK, kv_transfer_config=config)
        )

    thread = threading.Thread(target=build_producer)
    thread.start()
    consumer = EngineCore.from_engine_args(
        EngineArgs(**common, kv_transfer_config=transfer_config("kv_consumer", 1, port, **cfg))
    )
    thread.join(180)
    producer = built["p"]
    try:
        prompt = _ids(7, 41)
        producer.add_request(EngineCoreRequest("p", prompt, _params("do_remote_decode", 1), 1))
        producer.step()  # the first chunk: 16 tokens, blocks 0-3 written and ready (nobody subscribed yet)
        stream = producer.disagg.streams["p"]
        assert stream.ready_blocks == CHUNK // BLOCK and stream.consumer is None

        # the scheduler preempts it (as when a running request needs its blocks) ...
        sched, bm = producer.scheduler, producer.scheduler.block_manager
        seq = sched.seqs["p"]
        released = list(bm.block_table(seq))
        sched.running.remove(seq)
        sched._preempt(seq)
        # ... and another request takes the released blocks and writes its own KV there
        other = bm.pool.take(bm.num_free_blocks)
        assert set(released) <= {b.block_id for b in other}
        for t in producer.runner.kv_pool.tensors:
            t[:, released] = 7.0
        bm.release_blocks(other)

        # now the consumer subscribes; the producer takes the subscription before its next step
        received = {}
        orig_admit = consumer.disagg._admit

        def spy(s, first):  # the received blocks of every layer, before decoding writes past the prompt
            ids = list(consumer.scheduler.block_manager.block_table(s))
            received["kv"] = [t[:, ids].clone() for t in consumer.runner.kv_pool.tensors]
            return orig_admit(s, first)

        consumer.disagg._admit = spy
        consumer.add_request(EngineCoreRequest("d", prompt, _params("do_remote_prefill", 8), 8))
        _until(lambda: stream.consumer == 1, "the subscription came", lambda: producer.disagg.poll(0.05))

        held = {}
        orig_hold = producer.disagg.connector.hold

        def hold(h):  # the producer's blocks of the request once its prefill is done (the recompute's)
            held["kv"] = [t[:, h.block_ids].clone() for t in producer.runner.kv_pool.tensors]
            return orig_hold(h)

        producer.disagg.connector.hold = hold
        tokens = []

        def both():
            producer.step()
            out = consumer.step()
            assert not out.errors, out.errors
            tokens.extend(t for o in out.outputs for t in o.new_token_ids)

        _until(lambda: len(tokens) == 8, "the consumer decoded", both, 60)
        for layer, (got, want) in enumerate(zip(received["kv"], held["kv"])):
            assert torch.equal(got, want), f"layer {layer}: the consumer's blocks are not the producer's"
        _until(lambda: not producer.disagg.stats.held_blocks, "the producer's blocks were freed", both)
        assert bm.num_free_blocks == bm.num_blocks
        assert consumer.scheduler.block_manager.num_free_blocks == consumer.scheduler.block_manager.num_blocks
    finally:
        consumer.shutdown()
        producer.shutdown()

    single = EngineCore.from_engine_args(EngineArgs(**common, max_num_batched_tokens=CHUNK))
    try:
        greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        assert tokens == _run(single, [EngineCoreRequest("s", prompt, greedy, 8)])["s"]
    finally:
        single.shutdown()
