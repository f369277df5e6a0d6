"""The planner agrees with itself: a default concurrency and the same value given explicitly give the same rows,
and no row predicts more concurrent sequences than it says it can hold."""

import pytest

from meshserve.cli import main
from meshserve.planner.hardware import get_gpu
from meshserve.planner.model import load_model
from meshserve.planner.plan import PlanRequest, make_plan


def plan(model, num_gpus, gpu="H100-SXM", **kw):
    return make_plan(PlanRequest(model=load_model(model), gpu=get_gpu(gpu), num_gpus=num_gpus, **kw))


def row(c):
    # Everything a table row shows, bar the asked-for concurrency itself.
    return (c.layout, c.memory, c.max_concurrency, c.max_concurrency_full_len, c.prediction, c.cost)


@pytest.mark.parametrize("model, num_gpus", [("llama-3.1-70b", 8), ("llama-3.1-8b", 8), ("mixtral-8x7b", 4)])
def test_default_and_explicit_concurrency_give_identical_rows(model, num_gpus):
    default = plan(model, num_gpus)
    assert default.candidates
    for c in default.candidates:
        explicit = plan(model, num_gpus, concurrency=c.prediction.concurrency, tp=c.layout.tp, pp=c.layout.pp,
                        dp=c.layout.dp)
        same = [e for e in explicit.candidates if e.layout == c.layout]
        assert same and row(same[0]) == row(c)


def test_issue_command_70b_on_eight_h100_agrees(capsys):
    # The issue's case: 48.5 GB (KV 10.7) by default vs 64.6 GB (KV 26.8) with --concurrency 512.
    tables = []
    for extra in ([], ["--concurrency", "512"]):
        assert main(["plan", "llama-3.1-70b", "--gpu", "H100-SXM", "--num-gpus", "8", *extra]) == 0
        out = capsys.readouterr().out
        tables.append([line for line in out.splitlines() if line.startswith("1 ")])
    assert tables[0] == tables[1] and "64.6/76.9" in tables[0][0] and "26.8" in tables[0][0]


def test_memory_is_sized_for_the_concurrency_predicted():
    best = plan("llama-3.1-70b", 8).best
    per_replica = -(-best.prediction.concurrency // best.layout.dp)
    assert best.memory.kv == pytest.approx(per_replica * 1280 * best.memory.kv_bytes_per_token)


@pytest.mark.parametrize("kw", [{}, {"concurrency": 1}, {"concurrency": 100}, {"concurrency": 512},
                                {"concurrency": 10_000}, {"objective": "latency"},
                                {"objective": "latency", "concurrency": 4096}])
def test_no_row_predicts_above_its_max_concurrency(kw):
    for c in plan("llama-3.1-70b", 8, **kw).candidates:
        assert c.prediction.concurrency <= c.max_concurrency
        assert c.clamped == (c.requested_concurrency > c.max_concurrency)


def test_concurrency_above_the_max_is_clamped_and_said(capsys):
    result = plan("llama-3.1-70b", 8, concurrency=512)
    tp8 = next(c for c in result.candidates if c.layout.label == "TP=8")
    assert tp8.clamped and tp8.max_concurrency == 256 and tp8.prediction.concurrency == 256
    assert tp8.limited_by == "max_num_seqs"
    # Clamped, it predicts what the default plan predicts for the same layout.
    assert row(tp8) == row(next(c for c in plan("llama-3.1-70b", 8).candidates if c.layout == tp8.layout))
    assert main(["plan", "llama-3.1-70b", "--gpu", "H100-SXM", "--num-gpus", "8", "--concurrency", "512"]) == 0
    out = capsys.readouterr().out
    assert "256*" in out and "* TP=8: 512 concurrent asked, 256 at most (--max-num-seqs 256 per replica)" in out


def test_kv_memory_caps_concurrency_too():
    # 70B on 4 H100 holds far fewer than 10,000 requests: predicted at its maximum, flagged, reason says so.
    result = plan("llama-3.1-70b", 4, concurrency=10_000, max_num_seqs=100_000)
    best = result.best
    assert best.clamped and best.limited_by == "KV memory" and best.prediction.concurrency == best.max_concurrency
    assert best.memory.fits and "10,000 asked" in result.reason


@pytest.mark.parametrize("depth, steps", [(0, 2), (3, 3)])
def test_pipeline_stages_hold_max_num_seqs_per_step_in_flight(capsys, depth, steps):
    # The engine runs up to max_num_seqs sequences in each PP step in flight (one per stage by default), so a PP=2
    # replica holds steps x max_num_seqs; TP=2 one batch.
    pp2 = plan("llama-3.1-8b", 2, pp=2, concurrency=1000, max_num_seqs=8, pipeline_depth=depth).best
    assert pp2.layout.pp == 2 and pp2.limited_by == "max_num_seqs"
    assert pp2.max_concurrency == steps * 8 == pp2.prediction.concurrency
    tp2 = plan("llama-3.1-8b", 2, tp=2, concurrency=1000, max_num_seqs=8, pipeline_depth=depth).best
    assert tp2.layout.tp == 2 and tp2.max_concurrency == 8
    argv = ["plan", "llama-3.1-8b", "--gpu", "H100-SXM", "--num-gpus", "2", "--pp", "2", "--concurrency", "1000",
            "--max-num-seqs", "8", "--pipeline-depth", str(depth)]
    assert main(argv) == 0
    assert f"{steps * 8} at most (--max-num-seqs 8 x {steps} steps in flight per replica)" in capsys.readouterr().out


def test_the_plans_pp_prediction_takes_its_pipeline_depth():
    # the same PP=2 replica and concurrency: one more step in flight splits the batch three ways (plan.py passes
    # --pipeline-depth to the speed arithmetic as the engine runs it)
    two = plan("llama-3.1-8b", 2, pp=2, concurrency=16, max_num_seqs=8).best.prediction
    three = plan("llama-3.1-8b", 2, pp=2, concurrency=16, max_num_seqs=8, pipeline_depth=3).best.prediction
    assert two.concurrency == three.concurrency == 16 and two.itl_s != three.itl_s


def test_a_pipeline_depth_below_the_stages_is_rejected():
    result = plan("llama-3.1-8b", 4, pp=4, pipeline_depth=3)
    assert not result.candidates
    assert any("--pipeline-depth 3 is below its 4 stages" in str(x) for x in result.rejections)
