"""A pipeline stage's activations (engine/pipeline_stage.py): received in place into the static buffers of the
graph that serves the step, sent from a copy only when a graph's buffers hold the output, send handles kept
until done; and the decode graphs' stage buffers filled and read across replays (with a fake CUDA graph:
none can be captured on a CPU). Two ranks over gloo: tests/distributed/test_parallel_layouts.py."""

from __future__ import annotations

import pytest
import torch

from meshserve.config import EngineArgs, ParallelConfig
from meshserve.engine import pipeline_stage
from meshserve.engine.cuda_graph import DecodeGraphs
from meshserve.engine.pipeline_stage import StageIO, handoff_lag
from meshserve.errors import InvalidArgumentError
from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.layers.pipeline import IntermediateTensors, copy_stage_input

HIDDEN = 4
CPU = torch.device("cpu")


def test_pipeline_depth_is_one_step_per_stage_unless_asked():
    assert ParallelConfig().pipeline_steps_in_flight == 0
    assert ParallelConfig(pipeline_parallel_size=2).pipeline_steps_in_flight == 2
    assert ParallelConfig(pipeline_parallel_size=2, pipeline_depth=3).pipeline_steps_in_flight == 3
    assert ParallelConfig(pipeline_parallel_size=1, pipeline_depth=3).pipeline_steps_in_flight == 0
    EngineArgs(pipeline_parallel_size=2, pipeline_depth=3).validate()
    with pytest.raises(InvalidArgumentError, match="pipeline_depth"):
        EngineArgs(pipeline_parallel_size=2, pipeline_depth=1).validate()


def test_pipeline_depth_flag_reaches_the_parallel_config():
    import argparse

    from meshserve.cli_args import add_engine_args, engine_args_from

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = engine_args_from(parser.parse_args(["-pp", "2", "--pipeline-depth", "3", "--pp-token-handoff"]))
    assert (args.pipeline_parallel_size, args.pipeline_depth, args.pp_token_handoff) == (2, 3, True)
    assert engine_args_from(parser.parse_args([])).pipeline_depth == 0
    assert not engine_args_from(parser.parse_args([])).pp_token_handoff


@pytest.mark.parametrize("async_scheduling,depth,in_flight", [(True, 3, 3), (True, 0, 2), (False, 3, 0)])
def test_the_running_cap_is_max_num_seqs_per_step_in_flight(tiny_model_dir, async_scheduling, depth, in_flight):
    """PP = 2 keeps pipeline_depth steps in flight (one per stage by default), each up to max_num_seqs: the
    resolved SchedulerConfig carries that depth and its max_running cap (one step at a time without async
    scheduling, when the stages do not pipeline), which the scheduler, KV pool, planner and simulator read."""
    from meshserve.engine.engine_config import create_engine_config

    config, _ = create_engine_config(EngineArgs(model=tiny_model_dir("qwen2"), pipeline_parallel_size=2,
                                                pipeline_depth=depth, max_num_seqs=4,
                                                async_scheduling=async_scheduling))
    sc = config.scheduler_config
    assert (sc.pipeline_depth, sc.max_running) == (in_flight, 4 * max(1, in_flight))
    one, _ = create_engine_config(EngineArgs(model=tiny_model_dir("qwen2"), max_num_seqs=4))
    assert (one.scheduler_config.pipeline_depth, one.scheduler_config.max_running) == (0, 4)


def test_token_handoff_is_a_parallel_config_field_with_one_line_errors():
    """pp_token_handoff turns the hand-off's lag on (one step per stage) only with PP > 1 and TP = 1; elsewhere
    EngineArgs refuses it in one line, naming the field."""
    assert handoff_lag(ParallelConfig(pipeline_parallel_size=2, pp_token_handoff=True)) == 2
    assert handoff_lag(ParallelConfig(pipeline_parallel_size=2)) == 0
    EngineArgs(pipeline_parallel_size=2, pp_token_handoff=True).validate()
    for bad, words in (({}, "pipeline_parallel_size > 1"),
                       ({"pipeline_parallel_size": 2, "tensor_parallel_size": 2}, "tensor_parallel_size 1"),
                       ({"pipeline_parallel_size": 2, "async_scheduling": False}, "async_scheduling")):
        with pytest.raises(InvalidArgumentError, match=f"^pp_token_handoff: .*{words}") as err:
            EngineArgs(pp_token_handoff=True, **bad).validate()
        assert "\n" not in str(err.value)


class FakeWork:
    def __init__(self, done: bool = False):
        self.done, self.waited = done, 0

    def is_completed(self) -> bool:
        return self.done

    def wait(self) -> None:
        self.waited += 1


@pytest.fixture
def wire(monkeypatch):
    """The stage's neighbours: receives fill each buffer with the next step's value; sends are recorded."""
    log = {"recv": [], "sent": [], "works": []}

    def recv(buffers):
        value = float(len(log["recv"]) + 1)
        for i, t in enumerate(buffers):
            t.fill_(value + i / 10)
        log["recv"].append(buffers)
        return buffers

    def send(tensors):
        log["sent"].append([(t, t.clone()) for t in tensors])  # the tensor, and what it held when sent
        works = [FakeWork() for _ in tensors]
        log["works"].append(works)
        return works

    monkeypatch.setattr(pipeline_stage, "recv_activations_into", recv)
    monkeypatch.setattr(pipeline_stage, "send_activations", send)
    return log


class StaticGraphs:
    """Stands for DecodeGraphs / MixedStepGraphs: static stage buffers for up to 8 rows."""

    def __init__(self):
        self.stage_in = IntermediateTensors(torch.zeros(8, HIDDEN), torch.zeros(8, HIDDEN))


def test_receive_in_place_into_the_graph_buffers_else_fresh(wire):
    io = StageIO(HIDDEN, torch.float32, CPU, is_first=False, is_last=True)
    graphs = StaticGraphs()
    got = io.receive(3, graphs)
    assert got.hidden.data_ptr() == graphs.stage_in.hidden.data_ptr()
    assert got.residual.data_ptr() == graphs.stage_in.residual.data_ptr()
    assert graphs.stage_in.hidden[:3].eq(1.0).all() and graphs.stage_in.hidden[3:].eq(0).all()
    assert torch.allclose(graphs.stage_in.residual[:3], torch.full((3, HIDDEN), 1.1))
    eager = io.receive(5, None)
    assert eager.hidden.shape == (5, HIDDEN) and eager.hidden.eq(2.0).all()
    assert eager.hidden.data_ptr() != graphs.stage_in.hidden.data_ptr()
    assert graphs.stage_in.hidden[:3].eq(1.0).all()  # an eager step leaves the graph's buffers alone
    assert (io.counts.graph_steps, io.counts.eager_steps) == (1, 1)


def test_first_stage_receives_nothing(wire):
    io = StageIO(HIDDEN, torch.float32, CPU, is_first=True, is_last=False)
    assert io.receive(3, StaticGraphs()) is None and io.receive(3, None) is None
    assert wire["recv"] == [] and io.counts.graph_steps == 1 and io.counts.eager_steps == 1


def test_send_copies_only_a_graphs_output(wire):
    io = StageIO(HIDDEN, torch.float32, CPU, is_first=True, is_last=False)
    static_out = IntermediateTensors(torch.ones(2, HIDDEN), torch.ones(2, HIDDEN))
    io.send(static_out, from_graph=True)
    static_out.hidden.fill_(7.0)  # the next replay overwrites the graph's output...
    (h, h_sent), (r, _) = wire["sent"][0]
    assert h.data_ptr() != static_out.hidden.data_ptr() and r.data_ptr() != static_out.residual.data_ptr()
    assert h.eq(1.0).all() and h_sent.eq(1.0).all()  # ...not what was sent
    eager_out = IntermediateTensors(torch.ones(2, HIDDEN), torch.ones(2, HIDDEN))
    io.send(eager_out, from_graph=False)
    assert wire["sent"][1][0][0] is eager_out.hidden  # an eager forward's output is its own: no copy
    assert io.counts.sends_copied == 1
    # gloo: each send is waited for (a dropped gloo send is cancelled)
    assert all(w.waited == 1 for works in wire["works"] for w in works) and io.sends_in_flight == 0


def test_nccl_sends_are_not_waited_but_kept_until_done(wire):
    io = StageIO(HIDDEN, torch.float32, torch.device("cuda"), is_first=True, is_last=False)
    out = IntermediateTensors(torch.ones(2, HIDDEN), torch.ones(2, HIDDEN))
    io.send(out, from_graph=False)
    io.send(out, from_graph=False)
    assert io.sends_in_flight == 4 and all(w.waited == 0 for works in wire["works"] for w in works)
    for w in wire["works"][0]:
        w.done = True
    io.send(out, from_graph=False)
    assert io.sends_in_flight == 4  # the completed pair dropped, the new pair kept


def test_copy_stage_input_skips_what_was_received_in_place():
    static = IntermediateTensors(torch.zeros(8, HIDDEN), torch.zeros(8, HIDDEN))
    static.hidden[:3] = 5.0
    copy_stage_input(static, IntermediateTensors(static.hidden[:3], static.residual[:3]))
    assert static.hidden[:3].eq(5.0).all()
    given = IntermediateTensors(torch.full((2, HIDDEN), 3.0), torch.full((2, HIDDEN), 4.0))
    copy_stage_input(static, given)
    assert static.hidden[:2].eq(3.0).all() and static.hidden[2].eq(5.0).all() and static.residual[:2].eq(4.0).all()


class FakeGraph:
    """A captured graph on a CPU: replay() reruns the captured forward on the same static buffers and writes
    into the same output tensors, as a CUDA graph replay does."""

    def __init__(self, forward, args, out):
        self.forward, self.args, self.out = forward, args, out

    def replay(self) -> None:
        fresh = self.forward(*self.args)
        self.out.hidden.copy_(fresh.hidden)
        self.out.residual.copy_(fresh.residual)


def _stage_forward(input_ids, positions, meta, intermediate):
    """A middle stage's layers, in miniature: every output row depends on its own inputs only."""
    return IntermediateTensors(intermediate.hidden * 2 + positions[:, None],
                               intermediate.residual + input_ids[:, None] + meta.seq_lens[:, None])


def _capture_fake(graphs: DecodeGraphs) -> None:
    """DecodeGraphs.capture without CUDA: the same static arguments, one fake graph per size and bound."""
    for bs in graphs.sizes:
        for bound in graphs.variants[bs]:
            args = (graphs.input_ids[:bs], graphs.positions[:bs], graphs._meta(bs, bound), graphs._stage_in(bs))
            out = graphs.forward(*args)
            graphs.graphs[bs, bound], graphs.outputs[bs, bound] = FakeGraph(graphs.forward, args, out), out


def _decode_meta(n: int, ctx: list[int]) -> AttentionMetadata:
    return AttentionMetadata(slot_mapping=torch.arange(n), query_start_loc=torch.arange(n + 1),
                             seq_lens=torch.tensor(ctx), block_tables=torch.zeros(n, 2, dtype=torch.int64),
                             max_query_len=1, max_seq_len=max(ctx), query_start_loc_cpu=list(range(n + 1)),
                             seq_lens_cpu=ctx)


def test_decode_graph_stage_buffers_filled_and_read_across_replays(wire):
    """Two stage steps in a row through the decode graphs (3 rows padded to the batch-4 graph, then 3 again):
    each step's activations arrive in the static buffers, the replay reads them, the real rows come back,
    and the copy sent for the first step survives the second replay."""
    graphs = DecodeGraphs(_stage_forward, 8, 32, 16, CPU, stage_input=(HIDDEN, torch.float32))
    _capture_fake(graphs)
    io = StageIO(HIDDEN, torch.float32, CPU, is_first=False, is_last=False)
    sent = []
    for n, ctx in ((3, [5, 9, 2]), (3, [6, 7, 3])):
        ids, pos = torch.arange(10, 10 + n), torch.tensor(ctx) - 1
        meta = _decode_meta(n, ctx)
        received = io.receive(n, graphs)
        expect = _stage_forward(ids, pos, meta, IntermediateTensors(received.hidden.clone(), received.residual.clone()))
        out = graphs.run(ids, pos, meta, received)
        assert out.hidden.shape == (n, HIDDEN)
        torch.testing.assert_close(out.hidden, expect.hidden)
        torch.testing.assert_close(out.residual, expect.residual)
        bs, bound = graphs.variant(n, meta.max_seq_len)
        assert out.hidden.data_ptr() == graphs.outputs[bs, bound].hidden.data_ptr()
        assert graphs.slot_mapping[n:bs].eq(-1).all() and graphs.seq_lens[n:bs].eq(0).all()  # padding rows
        io.send(out, from_graph=True)
        sent.append(expect)
    assert graphs.replays == 2
    # the first step's send went out from a copy: the second replay did not change it
    torch.testing.assert_close(wire["sent"][0][0][0], sent[0].hidden)
    torch.testing.assert_close(wire["sent"][0][1][0], sent[0].residual)
    assert io.counts.sends_copied == 2


def test_decode_graph_stage_input_copied_when_received_elsewhere():
    """The plain receive (fresh buffers) still reaches the graph: run() copies it into the static buffers."""
    graphs = DecodeGraphs(_stage_forward, 4, 32, 16, CPU, stage_input=(HIDDEN, torch.float32))
    _capture_fake(graphs)
    given = IntermediateTensors(torch.randn(1, HIDDEN), torch.randn(1, HIDDEN))
    ids, pos, meta = torch.tensor([3]), torch.tensor([4]), _decode_meta(1, [5])
    out = graphs.run(ids, pos, meta, given)
    torch.testing.assert_close(out.hidden, given.hidden * 2 + 4)
    torch.testing.assert_close(out.residual, given.residual + 3 + 5)
