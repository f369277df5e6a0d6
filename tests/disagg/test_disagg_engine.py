"""Prefill on one engine, decode on another (separate processes, gloo on loopback): the tokens are the ones a
single engine makes, the transferred blocks are byte-identical, and both sides free every block."""

from __future__ import annotations

import multiprocessing as mp
import random

import pytest
import torch

from meshserve.config import EngineArgs
from meshserve.engine.core import EngineCore
from meshserve.engine.messages import EngineCoreRequest
from meshserve.sampling import SamplingParams
from tests.conftest import VOCAB
from tests.disagg.engine_pair import free_port, join, producer_main, transfer_config

BLOCK = 4


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _run(
    core: EngineCore, requests: list[EngineCoreRequest], timeout_steps: int = 5000
) -> dict[str, list[int]]:
    for r in requests:
        core.add_request(r)
    tokens = {r.request_id: [] for r in requests}
    for _ in range(timeout_steps):
        if not core.has_unfinished_requests():
            break
        outs = core.step()
        assert not outs.errors, outs.errors
        for o in outs.outputs:
            tokens[o.request_id] += o.new_token_ids
    return tokens


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    """(producer process handle, command queue, result queue, consumer core, producer's block count)."""
    yield from engine_pair(tiny_model_dir, "torch")


def engine_pair(tiny_model_dir, connector: str):
    """The pair fixture's body for a connector (test_nixl_engine.py runs these tests over NIXL)."""
    model = tiny_model_dir("llama")
    port = free_port()
    common = {"model": model, "block_size": BLOCK, "max_model_len": 256, "num_gpu_blocks_override": 200}
    ctx = mp.get_context("spawn")
    commands, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(
        target=producer_main,
        args=(
            dict(
                common,
                kv_transfer_config=transfer_config(
                    "kv_producer",
                    0,
                    port,
                    connector=connector,
                    transfer_timeout_s=5,
                    hold_timeout_s=3,
                    init_timeout_s=120,
                ),
            ),
            commands,
            results,
        ),
        daemon=True,
    )
    proc.start()
    consumer = EngineCore.from_engine_args(
        EngineArgs(
            **common,
            kv_transfer_config=transfer_config(
                "kv_consumer", 1, port, connector=connector, transfer_timeout_s=5, init_timeout_s=120
            ),
        )
    )
    kind, num_blocks = results.get(timeout=300)  # a loaded machine starts slowly
    assert kind == "ready", num_blocks  # else the producer's start-up error
    yield proc, commands, results, consumer, num_blocks
    commands.put(("stop",))
    join(proc, 30)
    if proc.is_alive():
        proc.kill()
    consumer.shutdown()


def _prefill(commands, results, requests: list[EngineCoreRequest]) -> dict[str, list[int]]:
    for r in requests:
        commands.put(("add", r))
    done = {}
    while len(done) < len(requests):
        msg = results.get(timeout=120)
        assert msg[0] == "done", msg
        done[msg[1]] = msg
    return done


def test_tokens_match_a_single_engine_and_blocks_are_freed(pair, tiny_model_dir):
    _proc, commands, results, consumer, num_blocks = pair
    prefix = _ids(100, 37)  # shared by every prompt: prefix-cache hits on the producer
    prompts = [prefix + _ids(i, n) for i, n in enumerate((5, 30, 61, 90, 3))]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    # the producer: max_tokens 1 and hold the KV for a consumer; the first request warms the prefix
    def prod(i):
        p = SamplingParams(
            temperature=0,
            max_tokens=1,
            ignore_eos=True,
            kv_transfer_params={"do_remote_decode": True, "transfer_id": f"t{i}"},
        )
        return EngineCoreRequest(f"p{i}", prompts[i], p, 1)

    first = _prefill(commands, results, [prod(0)])
    rest = _prefill(commands, results, [prod(i) for i in range(1, len(prompts))])
    assert rest["p3"][3] >= 36  # a prefix-cache hit on the producer (blocks of the shared 37 tokens)
    done = {**first, **rest}

    # each producer's final output names its held blocks, the decode leg's handle (vLLM's kv_transfer_params)
    for i, prompt in enumerate(prompts):
        handle = done[f"p{i}"][4]
        assert handle["transfer_id"] == f"t{i}" and handle["remote_rank"] == 0
        assert len(handle["remote_block_ids"]) == -(-len(prompt) // BLOCK)
    # the consumer pulls every transfer concurrently and decodes; the odd ones with the handle (a one-sided
    # connector reads the named blocks beside the grant; a two-sided one is sent them as before)
    reqs = []
    for i, prompt in enumerate(prompts):
        ahead = done[f"p{i}"][4] if i % 2 else {"transfer_id": f"t{i}"}
        p = SamplingParams(
            temperature=0,
            max_tokens=12,
            ignore_eos=True,
            kv_transfer_params={"do_remote_prefill": True, **ahead},
        )
        reqs.append(EngineCoreRequest(f"d{i}", prompt, p, 12))
    before = consumer.scheduler_stats()
    got = _run(consumer, reqs)

    single = EngineCore.from_engine_args(
        EngineArgs(
            model=tiny_model_dir("llama"), block_size=BLOCK, max_model_len=256, num_gpu_blocks_override=200
        )
    )
    try:
        want = _run(single, [EngineCoreRequest(f"d{i}", p, greedy, 12) for i, p in enumerate(prompts)])
    finally:
        single.shutdown()
    for i in range(len(prompts)):
        assert done[f"p{i}"][2] == want[f"d{i}"][:1]  # the producer's first token
        assert got[f"d{i}"] == want[f"d{i}"], i

    stats = consumer.scheduler_stats()
    assert stats.kv_transfer_received == len(prompts) and stats.kv_transfer_failed == 0
    assert stats.kv_transfer_received_bytes > 0 and sum(stats.kv_transfer_latency_buckets) == len(prompts)
    assert consumer.scheduler.block_manager.num_free_blocks == consumer.scheduler.block_manager.num_blocks
    # vLLM's counters: each prompt came whole from outside (external prefix-cache tokens, asked and found), and
    # every token the decode leg sent (the producer's first, received, and 11 decoded) is in tokens per iteration,
    # with no prompt token computed here
    transferred = sum(map(len, prompts))
    assert stats.prefix_cache_external_hits - before.prefix_cache_external_hits == transferred
    assert stats.prefix_cache_external_queries - before.prefix_cache_external_queries == transferred
    assert stats.iteration_tokens[-1] - (before.iteration_tokens or [0])[-1] == 12 * len(prompts)
    assert stats.num_waiting_for_kv == 0
    commands.put(("blocks",))
    _kind, free, pstats = results.get(timeout=30)
    assert pstats["kv_transfer_sent"] == len(prompts) and pstats["kv_transfer_held_blocks"] == 0
    assert free == num_blocks  # the producer freed every block once acknowledged


def test_a_transfer_nobody_holds_fails_cleanly_and_frees_its_blocks(pair):
    _, _, _, consumer, _ = pair
    bm = consumer.scheduler.block_manager
    p = SamplingParams(
        temperature=0,
        max_tokens=4,
        ignore_eos=True,
        kv_transfer_params={"do_remote_prefill": True, "transfer_id": "never-held"},
    )
    consumer.add_request(EngineCoreRequest("x", _ids(5, 20), p, 4))
    assert bm.num_free_blocks == bm.num_blocks - 5  # allocated for the pull
    errors = []
    for _ in range(2000):
        if not consumer.has_unfinished_requests():
            break
        errors += consumer.step().errors
    assert [e.error_type for e in errors] == ["KVTransferError"] and "no producer holds" in errors[0].message
    assert bm.num_free_blocks == bm.num_blocks


def test_blocks_are_byte_identical(pair):
    """The consumer's received blocks equal the producer's (the producer's are recomputed here by a local
    prefill of the same prompt on the consumer: same weights, same kernels, so the same bytes)."""
    _, commands, results, consumer, _ = pair
    prompt = _ids(77, 43)
    p = SamplingParams(
        temperature=0,
        max_tokens=1,
        ignore_eos=True,
        kv_transfer_params={"do_remote_decode": True, "transfer_id": "bytes"},
    )
    _prefill(commands, results, [EngineCoreRequest("pb", prompt, p, 1)])
    seq_blocks = {}
    orig_admit = consumer.disagg._admit

    def spy(seq, first):  # the received blocks, before decoding writes anything past the prompt
        ids = list(consumer.scheduler.block_manager.block_table(seq))
        seq_blocks["recv"] = [t[:, ids].clone() for t in consumer.runner.kv_pool.tensors]
        return orig_admit(seq, first)

    consumer.disagg._admit = spy
    try:
        d = SamplingParams(
            temperature=0,
            max_tokens=2,
            ignore_eos=True,
            kv_transfer_params={"do_remote_prefill": True, "transfer_id": "bytes"},
        )
        _run(consumer, [EngineCoreRequest("db", prompt, d, 2)])
    finally:
        consumer.disagg._admit = orig_admit
    consumer.scheduler.block_manager.reset_prefix_cache()
    local = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    consumer.add_request(EngineCoreRequest("local", prompt, local, 1))
    seq = consumer.requests["local"]
    while consumer.has_unfinished_requests():
        consumer.step()
    # the local prefill's blocks are free again but keep their content: find them by the prompt's hashes
    bm = consumer.scheduler.block_manager
    ids = [bm.pool.cached[h].block_id for h in seq.block_hashes[: len(prompt) // BLOCK]]
    n_full = len(prompt) // BLOCK
    for layer, t in enumerate(consumer.runner.kv_pool.tensors):
        assert torch.equal(seq_blocks["recv"][layer][:, :n_full], t[:, ids])


def test_held_blocks_nobody_pulls_are_freed_after_the_hold_timeout(pair):
    """A decode instance that dies before pulling: the producer frees the blocks itself (hold_timeout_s 3)."""
    _, commands, results, _, num_blocks = pair
    p = SamplingParams(
        temperature=0,
        max_tokens=1,
        ignore_eos=True,
        kv_transfer_params={"do_remote_decode": True, "transfer_id": "orphan"},
    )
    _prefill(commands, results, [EngineCoreRequest("po", _ids(3, 30), p, 1)])
    commands.put(("blocks",))
    _, free, stats = results.get(timeout=30)
    assert stats["kv_transfer_expired"] == 1 and stats["kv_transfer_held_blocks"] == 0
    assert free == num_blocks
