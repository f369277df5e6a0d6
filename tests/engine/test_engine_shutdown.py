"""LLM.shutdown() gives the engine's memory back at once, so a second LLM in the same process can size its KV cache.

The next engine's memory profile counts every tensor still allocated in the process (kv_pool.py), so a dead
engine's KV cache that waits for the garbage collector leaves it no room (issue: the second LLM(...) of
tests/gpu/test_decode_fixed_cost.py found a negative KV budget on an H200). These run with the cyclic
collector off: what shutdown frees must go by reference counting alone.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from meshserve import LLM, SamplingParams
from meshserve.engine.cuda_graph import DecodeGraphs


@pytest.fixture
def no_cyclic_gc(monkeypatch):
    """Neither automatic nor explicit (LLM.shutdown's gc.collect) cyclic collection while the test runs."""
    was_enabled = gc.isenabled()
    gc.disable()
    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)
    yield
    if was_enabled:
        gc.enable()


def _llm_with_graphs(model_dir: str) -> LLM:
    """A CPU engine given the GPU path's graph holders (uncaptured): decode and mixed-step graphs, each
    holding the runner's forward (and the decode graphs its greedy head) as on a GPU
    (model_runner.allocate_kv_cache)."""
    llm = LLM(model=model_dir, block_size=4, max_model_len=256, max_num_seqs=4)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3, logprobs=1), use_tqdm=False)
    runner = llm.engine.runner
    # with the greedy head as a single-GPU engine captures it (sampled graphs): it is the runner's bound method
    runner.graphs = DecodeGraphs(runner.forward, 4, 256, 4, runner.device, sample_head=runner._greedy_head,
                                 sample_max_bs=2)
    assert runner.graphs.sample_sizes
    runner.mixed_graphs = runner.build_mixed_graphs(replay=False)
    assert runner.mixed_graphs is not None and runner.mixed_graphs.forward is not None
    return llm


def test_shutdown_frees_the_engine_while_a_caller_holds_its_graphs(tiny_model_dir, no_cyclic_gc):
    llm = _llm_with_graphs(tiny_model_dir("llama"))
    runner = llm.engine.runner
    # held across shutdown, as test_short_context_graphs_keep_greedy_tokens_fp32 holds llm.engine.runner.graphs
    graphs = runner.graphs
    alive = {
        "runner": weakref.ref(runner),
        "model": weakref.ref(runner.model),
        "core": weakref.ref(llm.engine.core),
    }
    alive.update({f"kv{i}": weakref.ref(t) for i, t in enumerate(runner.kv_pool.tensors)})
    assert len(alive) > 3
    del runner
    llm.shutdown()
    assert [name for name, ref in alive.items() if ref() is not None] == []
    assert graphs.forward is None and graphs.sample_head is None and graphs.graphs == {}


def test_shutdown_frees_the_kv_cache_while_a_caller_holds_the_runner(tiny_model_dir, no_cyclic_gc):
    llm = _llm_with_graphs(tiny_model_dir("llama"))
    runner = llm.engine.runner
    caches = [weakref.ref(t) for t in runner.kv_pool.tensors]
    assert caches and all(layer.kv_cache is not None for layer in runner.kv_pool.layers)
    llm.shutdown()
    assert [ref() for ref in caches] == [None] * len(caches)
    assert runner.kv_pool.tensors == [] and all(layer.kv_cache is None for layer in runner.kv_pool.layers)
    assert runner.graphs is None and runner.mixed_graphs is None


def test_calls_after_shutdown_are_a_clear_error(tiny_model_dir):
    # they were "'NoneType' object has no attribute 'core_client'" from inside LLM
    from meshserve.errors import EngineDeadError

    llm = LLM(model=tiny_model_dir("llama"), block_size=4, max_model_len=64)
    llm.shutdown()
    llm.shutdown()  # twice is fine
    for call in (lambda: llm.generate("hi", SamplingParams(max_tokens=1), use_tqdm=False),
                 lambda: llm.generate("hi", use_tqdm=False), lambda: llm.chat([{"role": "user", "content": "hi"}]),
                 llm.get_tokenizer):
        with pytest.raises(EngineDeadError, match="shut down"):
            call()
