"""The parallel pre-compile's wiring (engine/parallel_warmup.py) on the CPU: the switch, where the pass
applies, which steps it runs (the graph holders' eager runs of exactly their capture inputs, in capture
order), that a failing pass leaves the plain warm-ups to compile, and that the switch changes no token (on the
CPU it is off: Triton compiles nothing there). tests/gpu/test_gpu_parallel_compile.py checks the GPU start-up."""

from __future__ import annotations

import random

import pytest
import torch

from meshserve.engine import parallel_warmup
from meshserve.engine.cuda_graph import DecodeGraphs
from meshserve.engine.mixed_graph import MixedStepGraphs
from meshserve.engine.parallel_warmup import (cache_looks_cold, parallel_compile_applies, precompile,
                                              warm_up_steps)
from meshserve.kernels.parallel_compile import CompilePass
from meshserve.layers import backend_selection
from meshserve.layers.backend_selection import PARALLEL_COMPILE_ENV


def test_the_switch_reads_off_on_or_a_thread_count(monkeypatch):
    monkeypatch.setattr(backend_selection.parallel_compile, "default_workers", lambda: 16)
    for value, workers in (("", 16), ("0", 0), ("off", 0), ("1", 16), ("on", 16), ("6", 6)):
        monkeypatch.setenv(PARALLEL_COMPILE_ENV, value)
        assert backend_selection._parallel_compile_workers(on_cuda=True) == workers, value
        assert backend_selection._parallel_compile_workers(on_cuda=False) == 0  # no compiles off CUDA
    monkeypatch.delenv(PARALLEL_COMPILE_ENV)
    assert backend_selection._parallel_compile_workers(on_cuda=True) == 16  # on by default (its GPU tests passed on the H200)
    for value, workers in (("procs", 16), ("procs:6", 6), ("PROCS", 16)):  # the compiles in processes
        monkeypatch.setenv(PARALLEL_COMPILE_ENV, value)
        assert backend_selection._parallel_compile_workers(on_cuda=True) == workers, value
        assert backend_selection._parallel_compile_processes(), value
    monkeypatch.setattr(backend_selection.parallel_compile, "default_workers", lambda: 128)
    for value, workers in (("procs", backend_selection.MAX_COMPILE_PROCESSES), ("procs:40", 40), ("1", 128)):
        monkeypatch.setenv(PARALLEL_COMPILE_ENV, value)  # a process per core, but no more than a pass needs
        assert backend_selection._parallel_compile_workers(on_cuda=True) == workers, value
    for value in ("", "1", "6", "0"):
        monkeypatch.setenv(PARALLEL_COMPILE_ENV, value)
        assert not backend_selection._parallel_compile_processes(), value
    monkeypatch.setenv(PARALLEL_COMPILE_ENV, "many")
    with pytest.raises(ValueError, match=PARALLEL_COMPILE_ENV):
        backend_selection._parallel_compile_workers(on_cuda=True)


def test_the_pass_applies_to_one_cuda_rank_switched_on():
    assert parallel_compile_applies(16, "cuda", 1)
    assert not parallel_compile_applies(0, "cuda", 1)
    assert not parallel_compile_applies(16, "cpu", 1)
    assert not parallel_compile_applies(16, "cuda", 2)  # expert-parallel dispatch reads the router's output


def test_the_steps_are_the_warm_ups_then_each_graph_holders_capture_inputs():
    calls = []

    class Runner:
        def warm_up_prefill(self, num_blocks):
            calls.append(("prefill", num_blocks))

    class Holder:
        def __init__(self, name):
            self.name = name

        def warm_up(self):
            calls.append((self.name,))

    steps = warm_up_steps(Runner(), 40, [Holder("decode"), Holder("mixed")])
    assert calls == []  # nothing runs until the pass calls it
    steps()
    assert calls == [("prefill", 40), ("decode",), ("mixed",)]


def _recording_forward(seen):
    def forward(input_ids, positions, meta, intermediate):
        seen.append((input_ids.shape[0], meta.max_seq_len, meta.max_query_len, intermediate))

    return forward


def test_decode_graphs_warm_up_runs_the_capture_inputs_in_capture_order():
    seen = []
    graphs = DecodeGraphs(_recording_forward(seen), 20, 4096, 16, torch.device("cpu"), context_bounds=(256,),
                          splits_of=lambda bs, bound: 1 if bound <= 256 or bs >= 8 else 16)
    graphs.warm_up()
    expected = [(key, args[0].shape[0], args[2].max_seq_len) for key, args in graphs._capture_args()]
    assert [(bs, bound) for bs, bound, _, _ in seen] == [(bs, bound) for _, bs, bound in expected]
    # largest batch first, the short-context variants beside the full ones
    shapes = [s[:2] for s in seen]
    assert shapes[0] == (20, 4096) and (1, 256) in shapes and (16, 256) not in shapes
    assert not graphs.graphs  # nothing captured


def test_mixed_graphs_warm_up_runs_every_bucket_largest_first_on_padding():
    seen = []
    graphs = MixedStepGraphs(_recording_forward(seen), [16, 32, 64], max_num_seqs=20, max_model_len=64,
                             block_size=4, device=torch.device("cpu"), replay=False)
    graphs.slot_mapping.fill_(5)
    graphs.warm_up()
    assert [(tokens, q) for tokens, _, q, _ in seen] == [(64, 64), (32, 32), (16, 16)]
    assert graphs.slot_mapping.eq(-1).all()  # all padding: the warm-up writes no cache block


def test_a_failing_pass_is_logged_and_left_to_the_plain_warm_ups(monkeypatch, caplog):
    def broken(steps, workers, what):
        raise RuntimeError("no AsyncCompileMode here")

    monkeypatch.setattr(parallel_warmup, "compile_in_parallel", broken)
    assert precompile(lambda: None, 4, "steps") is None
    assert "parallel Triton pre-compile of steps failed" in caplog.text


def test_tokens_are_the_same_with_the_switch_on_and_off(tiny_model_dir, monkeypatch):
    from meshserve import LLM, SamplingParams
    from tests.conftest import VOCAB

    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(n)]} for n in (5, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for value in ("0", "1"):
        monkeypatch.setenv(PARALLEL_COMPILE_ENV, value)
        llm = LLM(model=tiny_model_dir("llama"), block_size=4, max_model_len=128)
        try:
            assert llm.engine.runner.kernels.parallel_compile_workers == 0  # the CPU: nothing to compile
            tokens[value] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.shutdown()
    assert tokens["0"] == tokens["1"] and all(len(t) == 8 for t in tokens["0"])


def test_the_pass_leaves_the_expert_load_counts_as_they_were(monkeypatch):
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("expert_load", torch.tensor([3, 0, 1]), persistent=False)

    model = torch.nn.Sequential(Experts(), Experts())
    monkeypatch.setattr(parallel_warmup, "compile_in_parallel", lambda steps, workers, what: steps())

    def steps():  # torch routing counts the warm-up's tokens
        for layer in model:
            layer.expert_load += 5

    precompile(steps, 4, "steps", model)
    assert all(layer.expert_load.tolist() == [3, 0, 1] for layer in model)


def test_the_warm_up_pass_runs_unless_the_profile_steps_kernels_all_came_from_the_disk_cache():
    assert cache_looks_cold(None)  # no profile pass ran (or it failed): nothing tells the cache is warm
    assert cache_looks_cold(CompilePass(submitted=40, compiled=3, seconds=2.0, workers=16))
    assert not cache_looks_cold(CompilePass(submitted=40, compiled=0, seconds=0.3, workers=16))
