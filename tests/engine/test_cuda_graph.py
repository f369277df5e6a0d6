"""Decode graphs' short-context variants: which bounds each batch size is captured for, which variant a step
replays, and the KV split count each variant's metadata gives the attention kernel. No graph is captured
here (CPU); tests/gpu/test_decode_fixed_cost.py replays them."""

from __future__ import annotations

import functools

import pytest
import torch

from meshserve.engine import capture_guard

from meshserve.engine.cuda_graph import DecodeGraphs, attention_split_counts, decode_graph_variants
from meshserve.kernels.triton_attention import TritonAttentionBackend, decode_num_splits
from meshserve.layers.attention import Attention, TorchAttentionBackend

H200_SMS = 132


def _llama8b_splits(num_seqs: int, max_seq_len: int) -> int:
    """The decode split count of a Llama-3.1-8B layer on an H200 (8 KV heads, 128-token tiles)."""
    return decode_num_splits(num_seqs, 8, max_seq_len, 128, H200_SMS)


def _graphs(bounds=(256, 1024), splits_of=_llama8b_splits, max_num_seqs=32) -> DecodeGraphs:
    return DecodeGraphs(
        None, max_num_seqs, 4096, 16, torch.device("cpu"), context_bounds=bounds, splits_of=splits_of
    )


def test_variants_only_where_the_split_count_differs():
    # full graphs (4,096) at batch 1/2/4/8: 16/16/8/4 splits; <= 1,024 tokens: 4; <= 256: 1; from batch 16 on
    # one program per SM is reached without splitting, so every bound gives 1 and no variant is kept
    variants = decode_graph_variants([1, 2, 4, 8, 16, 32], 4096, (256, 1024), _llama8b_splits)
    assert variants == {
        1: [256, 1024, 4096],
        2: [256, 1024, 4096],
        4: [256, 1024, 4096],
        8: [256, 4096],
        16: [4096],
        32: [4096],
    }
    assert [_llama8b_splits(1, b) for b in variants[1]] == [1, 4, 16]
    assert [_llama8b_splits(8, b) for b in variants[8]] == [1, 4]  # 1,024 would repeat the full graph's 4


def test_no_variants_without_bounds_or_a_split_rule():
    assert decode_graph_variants([1, 2], 4096, (), _llama8b_splits) == {1: [4096], 2: [4096]}
    assert decode_graph_variants([1, 2], 4096, (256,), None) == {1: [4096], 2: [4096]}
    # bounds at or past max_model_len are the full graph itself
    assert decode_graph_variants([1], 1024, (1024, 8192), _llama8b_splits) == {1: [1024]}


def test_a_step_replays_the_smallest_variant_holding_its_longest_context():
    graphs = _graphs()
    assert graphs.variant(1, 129) == (1, 256)
    assert graphs.variant(1, 256) == (1, 256)
    assert graphs.variant(1, 257) == (1, 1024)  # W1's later steps (up to 384 tokens)
    assert graphs.variant(1, 1025) == (1, 4096)
    assert graphs.variant(3, 300) == (4, 1024)  # padded to the batch-4 graph
    assert graphs.variant(5, 300) == (8, 4096)  # batch 8 has no 1,024 variant: the full graph, same splits
    assert graphs.variant(5, 200) == (8, 256)
    assert graphs.variant(20, 10) == (32, 4096)
    assert graphs.variant(1, 5000) == (1, 4096)  # past every bound: the full graph
    assert _graphs(bounds=()).variant(1, 100) == (1, 4096)


def _on_h200(monkeypatch):
    from meshserve.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "_num_sms", lambda device_index: H200_SMS)


def test_each_variant_bakes_its_bound_into_the_split_count(monkeypatch):
    _on_h200(monkeypatch)
    graphs = _graphs()
    backend = TritonAttentionBackend()
    cpu = torch.device("cpu")
    for (bs, bound), splits in {(1, 256): 1, (1, 1024): 4, (1, 4096): 16, (8, 256): 1, (8, 4096): 4}.items():
        meta = graphs._meta(bs, bound)
        assert meta.max_seq_len == bound and meta.num_seqs == bs and meta.is_decode_only
        # what the backend's _decode computes from this metadata during capture (1: DIRECT_OUT, no reduce)
        assert backend.decode_splits(meta.num_seqs, 8, 128, torch.bfloat16, meta.max_seq_len, cpu) == splits


def test_split_counts_come_from_each_layers_backend(monkeypatch):
    _on_h200(monkeypatch)
    triton_backend = TritonAttentionBackend()
    layers = [Attention(32, 128, 8, 0.1), Attention(32, 128, 8, 0.1)]
    for layer in layers:
        layer.backend = triton_backend
    cpu = torch.device("cpu")
    counts = functools.partial(attention_split_counts, layers, torch.bfloat16, cpu)
    assert counts(1, 4096) == (16, 16)
    assert counts(1, 1024) == (4, 4)
    assert counts(1, 128) == (1, 1)
    # each layer's own shape: one KV head of 256 dims (unbound first: the torch reference, no rule)
    assert (
        attention_split_counts([Attention(8, 256, 1, 0.1)], torch.bfloat16, cpu, 1, 4096) is None
    )  # unbound
    wide = Attention(8, 256, 1, 0.1)
    wide.backend = triton_backend
    assert attention_split_counts([wide], torch.bfloat16, cpu, 1, 4096) == (16,)
    assert attention_split_counts([wide], torch.bfloat16, cpu, 1, 512) == (2,)
    fixed = TritonAttentionBackend(decode_num_splits=3)
    assert fixed.decode_splits(1, 8, 128, torch.bfloat16, 128, cpu) == 3
    # a backend without a split rule (the torch reference) or a non-Attention layer (MLA): no variants
    layers[1].backend = TorchAttentionBackend()
    assert counts(1, 4096) is None
    assert attention_split_counts([torch.nn.Identity()], torch.bfloat16, cpu, 1, 4096) is None


def test_mla_layers_report_their_split_counts(monkeypatch):
    """MLA layers on the Triton path give the short-context graphs their split rule (kernels/triton_mla
    decode_split_count: one program holds V2-Lite's 16 heads); on the torch reference, no variants."""
    from meshserve.kernels import triton_mla
    from meshserve.layers.backend_selection import KernelSelection
    from meshserve.layers.mla_attention import MLAAttention

    monkeypatch.setattr(triton_mla, "_num_sms", lambda device_index: H200_SMS)
    cpu = torch.device("cpu")
    layers = [MLAAttention(16, 128, 64, 128, 512, 0.1) for _ in range(2)]
    assert attention_split_counts(layers, torch.bfloat16, cpu, 1, 4096) is None
    for layer in layers:  # by default: the split kernel below 64 rows, the balanced one (no splits) from 64
        layer.kernels = KernelSelection(attention_backend="triton")
    counts = functools.partial(attention_split_counts, layers, torch.bfloat16, cpu)
    assert counts(1, 163840) == (64, 64) and counts(1, 1024) == (4, 4) and counts(1, 256) == (1, 1)
    assert counts(48, 163840) == (4, 4) and counts(64, 163840) == (0, 0) and counts(256, 163840) == (0, 0)
    variants = decode_graph_variants([1, 16, 256], 163840, (256, 1024), counts)
    assert variants == {1: [256, 1024, 163840], 16: [256, 1024, 163840], 256: [163840]}
    for layer in layers:  # the split kernel forced (MESHSERVE_MLA_BALANCED=0): the MLA split rule everywhere
        layer.kernels = KernelSelection(attention_backend="triton", mla_balanced=False)
    assert counts(80, 163840) == (4, 4) and counts(256, 163840) == (1, 1)
    for layer in layers:  # the balanced kernel: one launch shape for every bound
        layer.kernels = KernelSelection(attention_backend="triton", mla_balanced=True)
    assert decode_graph_variants([1, 256], 163840, (256, 1024), counts) == {1: [163840], 256: [163840]}
    for layer in layers:  # the legacy rule: splits only below half the SMs
        layer.kernels = KernelSelection(attention_backend="triton", mla_legacy=True)
    assert counts(80, 163840) == (1, 1) and counts(1, 163840) == (64, 64)


class _FakeGraph:
    def __init__(self):
        self.was_reset = False

    def reset(self):
        self.was_reset = True


def test_release_frees_the_graphs_of_decode_and_mixed_step_holders(monkeypatch):
    """release() (DecodeGraphs and MixedStepGraphs share it) waits for the device once, resets every graph and
    drops the outputs, the pool and the runner's forward (a reference cycle otherwise)."""
    from meshserve.engine.mixed_graph import MixedStepGraphs

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
    mixed = MixedStepGraphs(lambda *a: None, [8], 2, 64, 16, torch.device("cpu"), replay=False)
    for holder in (_graphs(), mixed):
        graphs = {1: _FakeGraph(), 2: _FakeGraph()}
        holder.graphs.update(graphs)
        holder.outputs.update({1: torch.zeros(1), 2: torch.zeros(1)})
        holder.pool, holder.forward = object(), lambda *a: None
        holder.release()
        assert all(g.was_reset for g in graphs.values())
        assert not holder.graphs and not holder.outputs and holder.pool is None and holder.forward is None
        holder.release()  # again: nothing to wait for
    assert synced == [torch.device("cpu")] * 2


class _RecordingGraph:
    """torch.cuda.CUDAGraph's part that capture uses, on CPU: the pool it was captured into, or its own."""

    def __init__(self):
        self.own_pool = object()

    def pool(self):
        return self.own_pool


def _recording_capture(monkeypatch, events: list, skip_warm_ups: bool) -> None:
    """torch.cuda's capture on CPU, recording: synchronize, graph enter ("capture", pool) and exit ("end")."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _RecordingGraph)
    monkeypatch.setattr(capture_guard, "available", lambda: skip_warm_ups)

    class _Capturing:
        def __init__(self, graph, pool):
            self.graph, self.pool = graph, pool

        def __enter__(self):
            events.append(("capture", self.pool))

        def __exit__(self, *exc):
            events.append("end")

    monkeypatch.setattr(torch.cuda, "graph", _Capturing)


@pytest.mark.parametrize("skip_warm_ups", [True, False], ids=["later-graphs-unwarmed", "no-build-hook"])
def test_capture_warms_up_the_first_graph_then_captures_every_graph_into_its_pool(monkeypatch, skip_warm_ups):
    """capture() (DecodeGraphs and MixedStepGraphs share capture_graph), largest first: the first graph's forward
    runs eagerly, then inside the capture that makes the pool every later one reuses; the later graphs are
    captured without that warm-up run where Triton builds can be refused (capture_guard), with it where not;
    each graph's output is the captured forward's."""
    from meshserve.engine.mixed_graph import MixedStepGraphs

    events: list = []
    _recording_capture(monkeypatch, events, skip_warm_ups)

    def forward(input_ids, positions, meta, intermediate):
        events.append(("forward", input_ids.shape[0]))
        return torch.full((input_ids.shape[0],), float(len(events)))

    decode = DecodeGraphs(forward, 4, 4096, 16, torch.device("cpu"))
    mixed = MixedStepGraphs(forward, [8, 16], 2, 64, 16, torch.device("cpu"))
    for holder, keys, sizes in ((decode, [(4, 4096), (2, 4096), (1, 4096)], [4, 2, 1]),
                                (mixed, [16, 8], [16, 8])):
        events.clear()
        holder.capture()
        first_pool = holder.graphs[keys[0]].own_pool
        expected = [("forward", sizes[0]), "sync", ("capture", None), ("forward", sizes[0]), "end"]
        for n in sizes[1:]:
            warm = [] if skip_warm_ups else [("forward", n), "sync"]
            expected += warm + [("capture", first_pool), ("forward", n), "end"]
        assert events == expected + ["sync"]
        assert holder.num_warmed == (1 if skip_warm_ups else len(sizes))
        assert holder.pool is first_pool and list(holder.graphs) == keys
        captured = [i + 1.0 for i, e in enumerate(events) if isinstance(e, tuple) and e[0] == "forward"
                    and i > 0 and isinstance(events[i - 1], tuple) and events[i - 1][0] == "capture"]
        assert [holder.outputs[k][0].item() for k in keys] == captured  # the forward run inside each capture
        for key, n in zip(keys, sizes):
            assert holder.outputs[key].shape == (n,)


def test_a_capture_that_needs_a_triton_build_is_redone_after_its_warm_up(monkeypatch):
    """A later graph whose forward meets a kernel specialization not built yet: inside the capture Triton's
    build hook refuses it (capture_guard), the partial capture ends and is dropped, and that graph is captured
    again after an eager warm-up run (which builds it); the graphs after it skip their warm-up again."""
    triton = pytest.importorskip("triton")
    if not capture_guard.available():
        pytest.skip("this Triton has no jit_cache_hook")
    events: list = []
    _recording_capture(monkeypatch, events, True)
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", None)
    built = {4}  # the specializations built so far (batch 4's: the eager warm-ups before the captures)

    def forward(input_ids, positions, meta, intermediate):
        n = input_ids.shape[0]
        events.append(("forward", n))
        if n not in built:  # a launch of an unbuilt specialization: Triton calls its hook, then builds
            hook = triton.knobs.runtime.jit_cache_hook
            if hook is not None:
                hook(repr=f"kernel_{n}")
            built.add(n)
        return torch.full((n,), float(len(events)))

    decode = DecodeGraphs(forward, 4, 4096, 16, torch.device("cpu"))
    decode.capture()
    pool = decode.graphs[(4, 4096)].own_pool
    assert events == [
        ("forward", 4), "sync", ("capture", None), ("forward", 4), "end",
        ("capture", pool), ("forward", 2), "end", "sync",  # refused inside the capture: dropped
        ("forward", 2), "sync", ("capture", pool), ("forward", 2), "end",  # warmed (built), captured again
        ("capture", pool), ("forward", 1), "end", "sync",
        ("forward", 1), "sync", ("capture", pool), ("forward", 1), "end",
        "sync",
    ]
    assert decode.num_warmed == 3 and built == {1, 2, 4}
    assert triton.knobs.runtime.jit_cache_hook is None  # the hook before the captures, put back
    assert decode.outputs[(2, 4096)][0].item() == 13.0  # the second capture's forward (event 13)


@pytest.mark.parametrize("other_rank_ok", [True, False], ids=["every-rank-captured", "another-rank-refused"])
def test_tp_ranks_agree_on_which_graphs_take_a_warm_up_run(monkeypatch, other_rank_ok):
    """Under tensor parallelism a later graph is kept only if every TP rank captured it without its warm-up (a
    MIN over the TP group); where another rank refused a build, this rank drops its good capture too and warms
    up with it: the warm-up runs' collectives would otherwise wait for a rank that skips them."""
    import dataclasses

    from meshserve.engine import cuda_graph

    events: list = []
    _recording_capture(monkeypatch, events, True)
    group = object()
    state = dataclasses.replace(cuda_graph.get_parallel_state(), tp_size=2, tp_group=group)
    monkeypatch.setattr(cuda_graph, "get_parallel_state", lambda: state)

    def all_reduce(flag, op, group):
        events.append(("agree", int(flag.item()), group is state.tp_group))
        if not other_rank_ok:
            flag.zero_()

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)

    def forward(input_ids, positions, meta, intermediate):
        events.append(("forward", input_ids.shape[0]))
        return torch.zeros(input_ids.shape[0])

    decode = DecodeGraphs(forward, 2, 4096, 16, torch.device("cpu"))
    decode.capture()
    pool = decode.graphs[(2, 4096)].own_pool
    expected = [("forward", 2), "sync", ("capture", None), ("forward", 2), "end",  # the first: warmed, no vote
                ("capture", pool), ("forward", 1), "end", ("agree", 1, True)]
    if not other_rank_ok:
        expected += ["sync", ("forward", 1), "sync", ("capture", pool), ("forward", 1), "end"]
    assert events == expected + ["sync"]
    assert decode.num_warmed == (1 if other_rank_ok else 2)


def _decode_meta(num_seqs: int, context: int):
    from meshserve.kernels.attention_metadata import AttentionMetadata

    return AttentionMetadata(
        slot_mapping=torch.zeros(num_seqs, dtype=torch.int64),
        query_start_loc=torch.arange(num_seqs + 1),
        seq_lens=torch.full((num_seqs,), context),
        block_tables=torch.zeros(num_seqs, 4, dtype=torch.int64),
        max_query_len=1,
        max_seq_len=context,
        query_start_loc_cpu=list(range(num_seqs + 1)),
        seq_lens_cpu=[context] * num_seqs,
    )


def test_sampled_graphs_captured_for_the_small_sizes_after_the_plain_ones(monkeypatch):
    """With a greedy head, batch sizes up to sample_max_bs get a second graph of forward + head, captured after
    every plain graph into the same pool; its output is the head's (token ids). A batch replays one only at
    exactly a captured size: padded rows would give the LM head another row count than the plain path's.
    release() frees them with the plain ones."""
    events: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _RecordingGraph)
    monkeypatch.setattr(capture_guard, "available", lambda: True)

    class _Capturing:
        def __init__(self, graph, pool):
            pass

        def __enter__(self):
            events.append("capture")

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(torch.cuda, "graph", _Capturing)

    def forward(input_ids, positions, meta, intermediate):
        return torch.ones(input_ids.shape[0], 3)

    def head(hidden):
        events.append(("head", hidden.shape[0]))
        return torch.arange(hidden.shape[0])

    graphs = DecodeGraphs(forward, 32, 4096, 16, torch.device("cpu"), sample_head=head, sample_max_bs=4)
    graphs.capture()
    assert graphs.sample_sizes == {1, 2, 4}
    assert list(graphs.sampled_graphs) == [(4, 4096), (2, 4096), (1, 4096)]
    assert set(graphs.graphs) == {(bs, 4096) for bs in (1, 2, 4, 8, 16, 32)}
    # 6 plain captures, then per sampled graph the capture and its head (no warm-up run: capture_graph)
    assert events[:6] == ["capture"] * 6
    assert events[6:] == [e for n in (4, 2, 1) for e in ("capture", ("head", n))]
    assert graphs.sampled_outputs[2, 4096].tolist() == [0, 1]
    assert graphs.can_sample(_decode_meta(2, 100)) and graphs.can_sample(_decode_meta(4, 4096))
    assert not graphs.can_sample(_decode_meta(3, 100))  # padded to 4
    assert not graphs.can_sample(_decode_meta(8, 100))  # above sample_max_bs
    assert graphs.can_run(_decode_meta(3, 100))
    sampled = dict(graphs.sampled_graphs)
    for g in sampled.values():
        g.reset = lambda g=g: setattr(g, "was_reset", True)
    for g in graphs.graphs.values():
        g.reset = lambda: None
    graphs.release()
    assert all(g.was_reset for g in sampled.values())
    assert not graphs.sampled_graphs and not graphs.sampled_outputs and not graphs.can_sample(_decode_meta(2, 100))


def test_no_sampled_graphs_without_a_head_or_a_size():
    assert _graphs().sample_sizes == set()
    head = DecodeGraphs(None, 32, 4096, 16, torch.device("cpu"), sample_head=lambda h: h, sample_max_bs=0)
    assert head.sample_sizes == set()
    assert DecodeGraphs(None, 32, 4096, 16, torch.device("cpu"), sample_head=lambda h: h,
                        sample_max_bs=8).sample_sizes == {1, 2, 4, 8}
