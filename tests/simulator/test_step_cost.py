"""Step durations: the calibration file is the fit of the trace it names; GPUs and TP scale it sensibly."""

from __future__ import annotations

import dataclasses
import functools
import random
from pathlib import Path

import numpy as np
import pytest

from meshserve.engine.step_time import DeviceRates, StepShape
from meshserve.errors import InvalidArgumentError
from meshserve.planner.hardware import get_gpu
from meshserve.planner.memory import stage_shard
from meshserve.planner.model import load_model
from meshserve.planner.parallel import Layout
from meshserve.simulator.step_cost import (
    StepCost,
    calibration_for,
    fit_step_weights,
    load_calibration,
    load_tp_costs,
    read_step_traces,
)

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks/results"
QWEN_RUNS = "h200_1201_s15"
# each fit: its model and the step traces it was fitted to (several: fitted together)
SECTIONS = {"h200_before_mixed_graphs": ("llama-3.1-8b", ("w3_8b_slo_credit_steps.jsonl.gz",)),
            "h200_mixed_graphs": ("llama-3.1-8b", ("w3_8b_slo_graphs1024_steps.jsonl.gz",)),
            "h200_qwen3_0_6b": ("qwen3-0.6b", (f"{QWEN_RUNS}/w3_qwen_meshserve/w3q.tgz:steps.jsonl.gz",
                                               f"{QWEN_RUNS}/w3_qwen_1024/steps.jsonl.gz"))}


def _exists(trace: str) -> bool:
    """Whether a step trace (or the results archive holding it: ARCHIVE.tgz:MEMBER) is in this checkout."""
    archive, member, _ = trace.partition(".tgz:")
    return (RESULTS / (archive + ".tgz" if member else trace)).is_file()


@functools.cache
def _trace(section: str) -> list[dict]:
    files = SECTIONS[section][1]
    if not all(_exists(f) for f in files):
        pytest.skip("step trace not in this checkout")
    return read_step_traces(",".join(str(RESULTS / f) for f in files))


def _rates(gpu) -> DeviceRates:
    return DeviceRates(gpu.hbm_bytes_per_s, gpu.flops_per_s("bf16"))


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_calibration_is_the_fit_of_its_trace(section):
    model = load_model(SECTIONS[section][0])
    gpu, shard = get_gpu("H200"), stage_shard(model, Layout(), 0)
    rows = _trace(section)
    fitted, err = fit_step_weights(rows, shard.weight_bytes, shard.kv_bytes_per_token, _rates(gpu))
    stored = load_calibration(section)
    assert fitted.as_tuple() == pytest.approx(stored.as_tuple(), abs=1e-3)
    assert err < 0.10  # mean |predicted - measured| / measured per step
    # and the fitted model reproduces the trace's total device time
    cost = StepCost(model, gpu, weights=stored)
    total = sum(cost.time_s(r["tokens"], r["seqs"], r["context"]) for r in rows)  # = cost(StepShape(...))
    assert total == pytest.approx(sum(r["actual_s"] for r in rows), rel=0.01)


def test_qwen_fit_prices_each_runs_steps_and_the_peaks():
    """Qwen3-0.6B on the H200 (h200_qwen3_0_6b, the fit of these W3 runs' build, the split decode kernel's): each
    run's mean step within 2% (the 8B's weights were +26% on the max_num_seqs 1024 run), and the steps that set
    the peak (mixed, 192+ sequences: ~258 decodes + ~1,020 prompt tokens) within 5%."""
    model, gpu = load_model("qwen3-0.6b"), get_gpu("H200")
    cost = StepCost(model, gpu, weights=load_calibration("h200_qwen3_0_6b"))
    carried = StepCost(model, gpu, weights=load_calibration("h200_mixed_graphs"))
    rows = _trace("h200_qwen3_0_6b")
    runs = np.cumsum([0] + [r["t"] < p["t"] for p, r in zip(rows, rows[1:])])  # t restarts with each trace
    shape = np.array([(r["tokens"], r["seqs"], r["context"]) for r in rows])
    measured = np.array([r["actual_s"] for r in rows])
    predicted = np.array([cost.time_s(*s) for s in shape.tolist()])  # = cost(StepShape(...))
    peak = (shape[:, 0] > shape[:, 1]) & (shape[:, 1] >= 192)
    assert runs[-1] == 1
    for run in (0, 1):
        mine = runs == run
        assert predicted[mine].mean() == pytest.approx(measured[mine].mean(), rel=0.02)
        assert predicted[mine & peak].mean() == pytest.approx(measured[mine & peak].mean(), rel=0.05)
    last = runs == 1  # the max_num_seqs 1024 run: what the fit fixed
    assert np.mean([carried.time_s(*s) for s in shape[last].tolist()]) > 1.2 * measured[last].mean()


W2_TRACE = "h200_1205_s50/w2_step_traces/w2_steps_qwen3-0.6b.jsonl.gz"


def test_qwen_balanced_fit_is_the_w3_fit_with_the_kernels_kv_rate_and_prices_w2s_decode_steps():
    """[h200_qwen3_0_6b_balanced] (the model's default on the H200): the W3 fit with the balanced decode kernel's
    KV factor (1.17, from the kernel's measured read rate), which a free fit of the 2026-12-05 W2 step trace
    matches within 1% (1.165); with it the trace's decode steps of 64+ sequences (W2's KV-bound bulk, 76% of its
    GPU time) are priced +0.9..+2.4% by batch bucket, where the W3 fit's 1.367 priced them +13.5..+14.1%."""
    if not _exists(W2_TRACE):
        pytest.skip("step trace not in this checkout")
    model, gpu = load_model("qwen3-0.6b"), get_gpu("H200")
    balanced, w3 = load_calibration("h200_qwen3_0_6b_balanced"), load_calibration("h200_qwen3_0_6b")
    assert dataclasses.replace(balanced, kv_factor=w3.kv_factor) == w3 and balanced.kv_factor == 1.17
    rows = read_step_traces(str(RESULTS / W2_TRACE))
    shard = stage_shard(model, Layout(), 0)
    free, _ = fit_step_weights(rows, shard.weight_bytes, shard.kv_bytes_per_token, _rates(gpu))
    assert free.kv_factor == pytest.approx(balanced.kv_factor, rel=0.01)
    for weights, lo, hi in ((balanced, -0.04, 0.04), (w3, 0.10, 0.16)):
        cost = StepCost(model, gpu, weights=weights)
        for bucket in ((64, 127), (128, 255), (256, 256)):
            steps = [r for r in rows if r["tokens"] == r["seqs"] and bucket[0] <= r["seqs"] <= bucket[1]]
            err = sum(cost.time_s(r["tokens"], r["seqs"], r["context"]) for r in steps) / sum(
                r["actual_s"] for r in steps) - 1
            assert lo < err < hi, (weights, bucket, err)


def test_default_is_the_mixed_step_graphs_fit_with_the_builds_one_row_factor():
    """"default" is an alias of a section, not a third set of numbers: h200_1206, the mixed-step graphs' fit (its
    four weights and, carried, its tables) with today's build's one-row factor; other names are refused."""
    from meshserve.simulator.step_cost import calibration_entry

    assert load_calibration() == load_calibration("default") == load_calibration("h200_1206")
    assert dataclasses.replace(load_calibration(), one_row_dense_factor=None) == load_calibration("h200_mixed_graphs")
    for table in ("tp", "pipeline", "step_noise", "eager"):
        assert calibration_entry().get(table) == calibration_entry("h200_mixed_graphs").get(table), table
    assert load_calibration() != load_calibration("h200_before_mixed_graphs")
    with pytest.raises(InvalidArgumentError, match="h200_before_mixed_graphs"):
        load_calibration("h100")


def test_default_is_a_models_own_fit_where_it_has_one():
    """--calibration default on a GPU without fits of its own (the H200's are the default alias and
    default_by_model): qwen3-0.6b (by preset or HF id) its own fit, which carries the 8B's TP and pipeline tables
    (no such run of it); any other model the 8B's; a named fit is taken as named."""
    from meshserve.simulator.config import SimConfig
    from meshserve.simulator.pipeline import load_host_costs

    assert SimConfig(model="qwen3-0.6b", gpu="H200").calibration_section == "h200_qwen3_0_6b_balanced"
    assert SimConfig(model="Qwen/Qwen3-0.6B", gpu="H200").calibration_section == "h200_qwen3_0_6b_balanced"
    assert SimConfig(model="qwen3-8b", gpu="B200").calibration_section == "default"
    assert SimConfig(model="qwen3-0.6b", calibration="h200_mixed_graphs").calibration_section == "h200_mixed_graphs"
    assert calibration_for("default", "llama-3.1-8b") == "default"
    assert load_tp_costs("h200_qwen3_0_6b_balanced") == load_tp_costs("h200_mixed_graphs")
    assert load_host_costs("h200_qwen3_0_6b_balanced") == load_host_costs("h200_mixed_graphs")
    assert load_calibration("h200_qwen3_0_6b") != load_calibration("h200_mixed_graphs")


def test_a_gpu_with_fits_of_its_own_takes_them_by_model_then_for_every_model():
    """default_by_gpu: an H100 takes the H100 fit of the model (by preset or HF id), the 8B's H100 fit for any
    other model (the "*" entry), before default_by_model; those fits carry the H200 fits' TP, pipeline, eager
    and step-noise tables (their own curves measured none), each through what its donor carries in turn."""
    from meshserve.simulator.config import SimConfig
    from meshserve.simulator.step_cost import calibration_entry

    assert SimConfig(model="qwen3-0.6b").calibration_section == "h100_qwen3_0_6b_curve"  # H100-SXM: the default
    assert SimConfig(model="Qwen/Qwen3-0.6B").calibration_section == "h100_qwen3_0_6b_curve"
    assert SimConfig(model="llama-3.1-8b").calibration_section == "h100_llama_3_1_8b_curve"
    assert SimConfig(model="llama-3.1-70b").calibration_section == "h100_llama_3_1_8b_curve"
    assert calibration_for("default", "qwen3-0.6b", "H100-SXM") == "h100_qwen3_0_6b_curve"
    assert calibration_for("default", "qwen3-0.6b", "H200") == "h200_qwen3_0_6b_balanced"
    assert calibration_for("h200_mixed_graphs", "qwen3-0.6b", "H100-SXM") == "h200_mixed_graphs"
    qwen = calibration_entry("h100_qwen3_0_6b_curve")
    assert qwen["eager"] == calibration_entry("h200_qwen3_0_6b")["eager"]  # its donor's own table
    assert qwen["tp"] == calibration_entry("h200_mixed_graphs")["tp"]  # the donor's donor's
    assert load_calibration("h100_qwen3_0_6b_curve").seq_us > 0 and load_calibration("h200_mixed_graphs").seq_us == 0


def test_the_per_sequence_cost_adds_to_every_step_by_its_sequences():
    """seq_us: every step costs seq_us x its sequences more, decode lines and step shapes alike, the rest of the
    step as without it; a pipeline stage takes its layers' share of it."""
    model, gpu = load_model("llama-3.1-8b"), get_gpu("H100-SXM")
    base = load_calibration("h100_llama_3_1_8b_curve")
    without = StepCost(model, gpu, weights=dataclasses.replace(base, seq_us=0.0))
    with_ = StepCost(model, gpu, weights=base)
    for shape in (StepShape(64, 64, 64 * 600), StepShape(1, 1, 900), StepShape(512, 3, 2000)):
        assert with_(shape) - without(shape) == pytest.approx(base.seq_us * 1e-6 * shape.num_seqs, rel=1e-9)
        assert with_.time_s(shape.num_tokens, shape.num_seqs, shape.context_tokens) == pytest.approx(with_(shape))
    a, b = with_.decode_line(32, 32 * 500)
    a0, b0 = without.decode_line(32, 32 * 500)
    assert a - a0 == pytest.approx(base.seq_us * 1e-6 * 32) and b == b0
    stage = StepCost(model, gpu, weights=base, pp=2, stage=0)
    assert stage.weights.seq_us == pytest.approx(base.seq_us * 16 / 32)


def test_a_curve_fit_gives_the_stored_h100_fit():
    """fit_curve_weights on the forty-seventh session's H100 decode curve, with the kernel's measured KV rate,
    gives calibration.toml's h100_llama_3_1_8b_curve (what its source line says was run)."""
    import json

    from meshserve.simulator.step_cost import curve_points, fit_curve_weights

    path = RESULTS / "h100_1205_s47/llama/ms_curve_llama-3.1-8b.json"
    if not path.exists():
        pytest.skip("measured results not in this checkout")
    points, context = curve_points(json.loads(path.read_text()))
    assert [n for n, _ in points] == [1, 8, 32, 64, 128, 256] and context == 192
    gpu, shard = get_gpu("H100-SXM"), stage_shard(load_model("llama-3.1-8b"), Layout(), 0)
    stored = load_calibration("h100_llama_3_1_8b_curve")
    w, err = fit_curve_weights(points, context, shard.weight_bytes, shard.kv_bytes_per_token,
                               DeviceRates(gpu.hbm_bytes_per_s, gpu.flops_per_s("bf16")), stored.kv_factor,
                               stored.mixed_ms)
    for got, want in zip(dataclasses.astuple(w), dataclasses.astuple(stored)):
        assert got == pytest.approx(want, abs=5e-4)
    assert err < 0.05


def test_the_refit_command_prints_the_stored_fit_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    """`python -m meshserve.simulator.step_cost --curve ...` (PLANNER.md's refit command) prints the stored Qwen
    H100 fit from its source curve; a missing or foreign file, a bad number, GPU or model is argparse's one-line
    error (exit 2), not a traceback."""
    from meshserve.simulator.step_cost import main

    curve = RESULTS / "h100_1205_s47/qwen/ms_curve_qwen3-0.6b.json"
    if not curve.exists():
        pytest.skip("measured results not in this checkout")
    stored = load_calibration("h100_qwen3_0_6b_curve")
    assert main(["--curve", str(curve), "H100-SXM", "qwen3-0.6b", str(stored.kv_factor), str(stored.mixed_ms)]) == 0
    printed = dict(line.split(" = ") for line in capsys.readouterr().out.splitlines() if " = " in line)
    assert float(printed["seq_us"]) == pytest.approx(stored.seq_us, abs=1e-3)
    assert float(printed["constant_ms"]) == pytest.approx(stored.constant_ms, abs=1e-3)
    not_json = tmp_path / "notes.txt"
    not_json.write_text("hello")
    foreign = tmp_path / "other.json"
    foreign.write_text('{"results": [{"workload": "decode-b1"}]}')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for argv, says in [
        (["--curve", str(tmp_path / "missing.json"), "H100-SXM", "qwen3-0.6b", "1.1", "1"], "No such file"),
        (["--curve", str(not_json), "H100-SXM", "qwen3-0.6b", "1.1", "1"], "JSONDecodeError"),
        (["--curve", str(foreign), "H100-SXM", "qwen3-0.6b", "1.1", "1"], "not a `bench latency --curve` JSON"),
        (["--curve", str(curve), "H100-SXM", "qwen3-0.6b", "-1", "1"], "must be > 0"),
        (["--curve", str(curve), "H100-SXM", "qwen3-0.6b", "abc", "1"], "expected a number"),
        (["--curve", str(curve), "NOPE", "qwen3-0.6b", "1.1", "1"], "unknown GPU"),
        (["--curve", str(curve), "H100-SXM", "no-such-model", "1.1", "1"], "neither a preset"),
        ([str(empty)], "no steps"),
        ([str(not_json)], "JSONDecodeError"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("python -m meshserve.simulator.step_cost")


def test_gpus_and_tensor_parallelism():
    model = load_model("llama-3.1-8b")
    decode = StepShape(64, 64, 64 * 600)
    h100, h200 = StepCost(model, get_gpu("H100-SXM")), StepCost(model, get_gpu("H200"))
    assert h100(decode) > h200(decode)  # less bandwidth
    assert h100(decode) / h200(decode) == pytest.approx(4800 / 3350, rel=0.1)
    tp2 = StepCost(model, get_gpu("H100-SXM"), tp=2)
    assert tp2.comm_s(64) > 0 and h100.comm_s(64) == 0
    assert tp2(decode) < h100(decode)  # half the weights per GPU outweighs the all-reduces
    prefill = StepShape(4096, 1, 4096)
    assert h100(prefill) > h100(decode)


def test_time_s_is_the_models_prediction_to_the_bit():
    """StepCost.time_s (the fast replica's per-step price, no StepShape built) and StepCost(shape) are one
    computation, with the mixed-step graphs' threshold too."""
    rng = random.Random(0)
    for tp, graphed in ((1, 0), (2, 0), (1, 512)):
        cost = StepCost(load_model("llama-3.1-8b"), get_gpu("H100-SXM"), tp)
        cost.model.graphed_mixed_tokens = graphed
        for _ in range(2000):
            seqs = rng.randint(1, 256)
            tokens = rng.randint(seqs, 9000)
            context = rng.randint(tokens, 300_000)
            assert cost.time_s(tokens, seqs, context) == cost(StepShape(tokens, seqs, context))
        a, b = cost.decode_line(12, 7000)
        assert a + 3 * b == pytest.approx(cost(StepShape(12, 12, 7000 + 36)), rel=1e-12)


def test_tp2_step_is_the_tp1_terms_halved_plus_the_all_reduces_and_the_layers_fixed_costs():
    """Closed form of a decode step at TP=2 on an H200 (calibration.toml's weights and TP costs): the fit's
    weight/FLOP and KV times of one GPU's half, plus 64 ring all-reduces of the batch's hidden states over the
    catalog's NVLink (8 us + bytes / 450 GB/s), plus (1 - 1/2) x 32 layers x (layer_us + layer_seq_us x n)."""
    from meshserve.simulator.step_cost import load_tp_costs

    model, gpu = load_model("llama-3.1-8b"), get_gpu("H200")
    # the mixed-step graphs' fit (the default's without its one-row factor: this is TP's closed form)
    w, tpc = load_calibration("h200_mixed_graphs"), load_tp_costs()
    assert (tpc.layer_us, tpc.layer_seq_us) == (15.9, 0.82)
    tp1, tp2 = StepCost(model, gpu, weights=w), StepCost(model, gpu, tp=2, weights=w)
    for n, context in ((1, 129), (64, 64 * 700), (256, 256 * 1100)):
        weights_ms = 1e3 * tp1.model.weight_bytes / 4.8e12  # one GPU reads all 16 GB
        flops_ms = 1e3 * 2 * tp1.model.params * n / 989e12
        kv_ms = 1e3 * context * 131072 / 4.8e12
        dense_tp2 = max(weights_ms, flops_ms) / 2  # each GPU half (the norms are the few bytes not split)
        device_ms = w.constant_ms + w.dense_factor * dense_tp2 + w.kv_factor * kv_ms / 2
        allreduces_ms = 64 * (8e-3 + n * 4096 * 2 / 450e9 * 1e3)
        fixed_ms = 0.5 * 32 * (tpc.layer_us + tpc.layer_seq_us * n) * 1e-3
        expected = (device_ms + allreduces_ms + fixed_ms) * 1e-3
        assert tp2(StepShape(n, n, context)) == pytest.approx(expected, rel=1e-4)
        assert tp2.tp_s(n, n) == pytest.approx((allreduces_ms + fixed_ms) * 1e-3, rel=1e-12)
    # at batch 1 the fixed costs are 0.26 ms of a ~3.25 ms step (the W1 8B TP=2 profile measured 3.4 ms)
    assert tp2(StepShape(1, 1, 129)) == pytest.approx(3.25e-3, rel=0.01)


def test_tp1_is_untouched_by_the_tp_costs():
    """At tp = 1 StepCost is the engine's StepTimeModel to the bit, whatever the TP costs say; at tp = 4 the
    fixed costs are (1 - 1/4) of the layers'."""
    from meshserve.simulator.step_cost import TpCosts

    model, gpu = load_model("llama-3.1-8b"), get_gpu("H200")
    plain = StepCost(model, gpu, tp_costs=TpCosts())
    heavy = StepCost(model, gpu, tp_costs=TpCosts(1e3, 1e3))
    rng = random.Random(1)
    for _ in range(500):
        seqs = rng.randint(1, 256)
        tokens = rng.randint(seqs, 9000)
        context = rng.randint(tokens, 300_000)
        shape = StepShape(tokens, seqs, context)
        assert heavy(shape) == plain(shape) == plain.model.predict(shape)
        assert heavy.time_s(tokens, seqs, context) == plain.model.predict(shape)
    assert heavy.decode_line(12, 7000) == plain.decode_line(12, 7000)
    assert heavy.decode_durations(12, 7000, 5) == plain.decode_durations(12, 7000, 5)
    bare4, tp4 = StepCost(model, gpu, tp=4, tp_costs=TpCosts()), StepCost(model, gpu, tp=4, tp_costs=TpCosts(10, 1))
    assert tp4.tp_s(8, 8) - bare4.tp_s(8, 8) == pytest.approx(0.75 * 32 * (10 + 8) * 1e-6, rel=1e-12)


def test_fused_norm_saves_its_measured_microseconds_per_all_reduce():
    """MESHSERVE_TP_FUSED_NORM: each of the 8B's 64 all-reduces of a TP=2 step costs what the all-reduce bench
    measured less (one-shot + norm minus the fused kernel: 2.53 us pull, 3.33 us push at batch 1); past the
    kernel's buffer the engine runs unfused, and TP=1 has no all-reduce to fuse."""
    from meshserve.simulator.step_cost import load_fused_norm

    model, gpu = load_model("llama-3.1-8b"), get_gpu("H200")
    plain = StepCost(model, gpu, tp=2)
    pull, push = (StepCost(model, gpu, tp=2, fused_norm=v) for v in ("pull", "push"))
    one = StepShape(1, 1, 200)
    assert plain(one) - pull(one) == pytest.approx(64 * 2.53e-6)
    assert plain(one) - push(one) == pytest.approx(64 * 3.33e-6)
    # between the measured sizes, linearly: batch 8 = 64 KiB, a third of the way from 32 to 128 KiB
    eight = StepShape(8, 8, 1600)
    assert plain(eight) - pull(eight) == pytest.approx(64 * (2.87 + (3.63 - 2.87) / 3) * 1e-6)
    big = StepShape(512, 512, 100_000)  # 4 MiB per all-reduce: past the one-shot kernel's 2 MiB
    assert pull(big) == plain(big) and push(StepShape(200, 200, 4000)) == plain(StepShape(200, 200, 4000))
    assert StepCost(model, gpu, fused_norm="push")(one) == StepCost(model, gpu)(one)
    assert load_fused_norm("pull").max_kib == 2048
    with pytest.raises(InvalidArgumentError, match="fused_norm_sideways"):
        load_fused_norm("sideways")


def test_narrower_dtypes_take_their_measured_fraction_of_the_bf16_terms():
    """--dtype / --kv-dtype: a dtype in calibration.toml's [dtype_time] costs its measured fraction of the bf16
    term at the same tokens, not its bytes' (the fp8 cache's decode attention takes 0.76 of bf16's time for
    half the bytes); the FLOPs follow the parameters, whatever the bytes; an unlisted dtype is priced by bytes."""
    from meshserve.simulator.step_cost import load_dtype_time

    model, gpu = load_model("llama-3.1-8b"), get_gpu("H200")
    table = load_dtype_time()
    assert table.kv["fp8"] == pytest.approx(0.761) and table.weights["fp8"] == pytest.approx(0.621)
    bf16, fp8kv = StepCost(model, gpu), StepCost(model, gpu, kv_dtype="fp8")
    decode, empty = StepShape(256, 256, 256 * 1000), StepShape(256, 256, 0)
    kv_term = bf16(decode) - bf16(empty)
    assert fp8kv(decode) - fp8kv(empty) == pytest.approx(0.761 * kv_term, rel=1e-9)
    assert fp8kv(empty) == bf16(empty)  # the weight term is the weights' alone
    fp8w = StepCost(model, gpu, weight_dtype="fp8")
    assert fp8w.model.params == bf16.model.params  # FLOPs of the same parameters, at the fp8 rate
    wide = stage_shard(model, Layout(), 0).weight_bytes
    assert fp8w.model.weight_bytes == pytest.approx(0.621 * wide)
    batch1 = StepShape(1, 1, 0)  # bandwidth-bound: the measured fraction of bf16's weight term
    c = bf16.weights.constant_ms * 1e-3
    assert fp8w(batch1) - c == pytest.approx(0.621 * (bf16(batch1) - c), rel=1e-9)
    int8 = StepCost(model, gpu, weight_dtype="int8")  # not measured: its bytes
    assert int8.model.weight_bytes == stage_shard(model, Layout(), 0, "int8").weight_bytes


def test_moe_steps_read_the_experts_their_tokens_route_to():
    """A MoE step reads the dense weights plus, per MoE layer, the expected share of its experts the step's
    tokens touch (uniform routing), at least the layer's floor; its FLOPs are the active parameters'; each MoE
    layer adds its routing launch. Dense models are untouched."""
    from meshserve.planner.perf import expected_experts_touched
    from meshserve.simulator.moe_steps import MoeStepModel
    from meshserve.simulator.step_cost import load_moe_costs

    model, gpu = load_model("qwen3-30b-a3b"), get_gpu("H200")
    cost = StepCost(model, gpu)
    m = cost.model
    assert isinstance(m, MoeStepModel) and not isinstance(StepCost(load_model("llama-3.1-8b"), gpu).model, MoeStepModel)
    shard = stage_shard(model, Layout(), 0)
    experts = shard.num_moe_layers * shard.experts_per_gpu * shard.expert_slice_bytes
    layer = experts / shard.num_moe_layers
    floor = load_moe_costs().floor_us * 1e-6 * gpu.hbm_bytes_per_s
    for tokens in (1, 8, 256, 4096):
        touched = expected_experts_touched(128, 8, tokens) / 128
        want = shard.weight_bytes - experts + shard.num_moe_layers * max(layer * touched, floor)
        assert m.step_weight_bytes(tokens) == pytest.approx(want, rel=1e-12)
    assert m.step_weight_bytes(4096) == pytest.approx(shard.weight_bytes, rel=1e-6)  # every expert
    assert m.step_weight_bytes(1) < 0.35 * shard.weight_bytes  # 8 of 128 experts a layer (or the floor)
    # FLOPs: the active parameters (top-8 of 128 experts), not every expert's
    assert m.params == pytest.approx(model.active_params, rel=0.02)
    # the routing launch per MoE layer per step, in every path the replicas price steps by
    assert cost.extra_s(1, 1) == pytest.approx(48 * load_moe_costs().route_us * 1e-6)
    assert cost.time_s(256, 256, 256 * 600) == cost(StepShape(256, 256, 256 * 600))
    a, b = cost.decode_line(32, 5000)
    assert a + 2 * b == pytest.approx(cost(StepShape(32, 32, 5000 + 64)), rel=1e-12)
    assert cost(StepShape(256, 256, 0)) > 3 * cost(StepShape(1, 1, 0))  # a big batch reads every expert


def test_mla_prices_its_kv_term_and_layers_from_the_calibration():
    from meshserve.simulator.step_cost import load_mla_costs

    model, gpu = load_model("deepseek-v2-lite"), get_gpu("H200")
    cost, mla = StepCost(model, gpu), load_mla_costs()
    assert cost.model.kv_bytes_per_token == pytest.approx(mla.kv_time * stage_shard(model, Layout(), 0).kv_bytes_per_token)
    assert cost.extra_s(1, 1) > model.num_layers * mla.layer_us * 1e-6  # plus the MoE layers' routing


def test_a_fit_may_carry_its_builds_moe_and_mla_costs():
    """load_moe_costs / load_mla_costs(name): the top-level [moe] / [mla] (the build now) with the named fit's own
    table over it; StepCost prices by the costs it is given, and the fleet by its fit's."""
    from meshserve.simulator.step_cost import MoeCosts, load_mla_costs, load_moe_costs

    now, old = load_moe_costs(), load_moe_costs("h200_moe_1201")
    assert old.floor_us > now.floor_us and old.route_us == now.route_us  # route_us: not in the fit's table
    assert load_moe_costs("h200_mixed_graphs") == now  # a fit without a table of its own
    assert load_mla_costs("h200_moe_1201").layer_us != load_mla_costs().layer_us
    model, gpu = load_model("qwen3-30b-a3b"), get_gpu("H200")
    one = StepShape(1, 1, 256)
    slow = StepCost(model, gpu, moe_costs=old)
    assert slow.moe_costs == old and slow(one) > StepCost(model, gpu)(one)
    # at 256 tokens every expert is read: the floor does not bind
    assert slow(StepShape(256, 256, 0)) == pytest.approx(StepCost(model, gpu)(StepShape(256, 256, 0)), rel=1e-12)
    # a dense model ignores both
    assert StepCost(load_model("llama-3.1-8b"), gpu, moe_costs=MoeCosts(99.0, 99.0))(one) == \
        StepCost(load_model("llama-3.1-8b"), gpu)(one)


def test_fit_layer_cost_inverts_the_one_token_step():
    """fit_layer_cost: the floor (or MLA layer cost) at which W1's one-token step lasts 1 / tok/s; put back, the
    step prices that rate; a rate out of reach, a model without such layers or an unknown table: one error."""
    from meshserve.simulator.step_cost import W1_CONTEXT, MoeCosts, fit_layer_cost, load_moe_costs

    gpu, weights = get_gpu("H200"), load_calibration()
    qwen, ds = load_model("qwen3-30b-a3b"), load_model("deepseek-v2-lite")
    floor = fit_layer_cost(qwen, gpu, weights, 300.0, "moe")
    moe = MoeCosts(load_moe_costs().route_us, floor)
    assert 1.0 / StepCost(qwen, gpu, weights=weights, moe_costs=moe)(StepShape(1, 1, W1_CONTEXT)) == \
        pytest.approx(300.0, rel=1e-5)
    assert fit_layer_cost(qwen, gpu, weights, 250.0, "moe") > floor  # slower: a higher floor
    layer = fit_layer_cost(ds, gpu, weights, 300.0, "mla", moe_costs=moe)
    assert layer > 0
    for args in ((qwen, gpu, weights, 1e6, "moe"), (qwen, gpu, weights, 300.0, "mla"),
                 (load_model("llama-3.1-8b"), gpu, weights, 300.0, "moe"), (qwen, gpu, weights, 300.0, "dense")):
        with pytest.raises(InvalidArgumentError):
            fit_layer_cost(*args)


def test_a_one_row_dense_factor_prices_one_token_steps_alone():
    """one_row_dense_factor: a one-token step's dense term at that factor instead of the shared one, through
    every path that prices a step (the call, step shapes, decode lines); every other step as without it; a
    pipeline stage keeps it."""
    model, gpu = load_model("llama-3.1-8b"), get_gpu("H200")
    base = load_calibration("h200_mixed_graphs")
    assert base.one_row_dense_factor is None
    without = StepCost(model, gpu, weights=base)
    with_ = StepCost(model, gpu, weights=dataclasses.replace(base, one_row_dense_factor=1.2))
    saved = (base.dense_factor - 1.2) * with_.model.dense_s(1)
    assert saved > 0
    for shape in (StepShape(1, 1, 300), StepShape(1, 1, 4000)):
        assert without(shape) - with_(shape) == pytest.approx(saved, rel=1e-9)
        assert with_.time_s(1, 1, shape.context_tokens) == pytest.approx(with_(shape), rel=1e-12)
    for shape in (StepShape(2, 2, 600), StepShape(64, 64, 64 * 600), StepShape(512, 3, 2000)):
        assert with_(shape) == without(shape)
    (a, b), (a0, b0) = with_.decode_line(1, 300), without.decode_line(1, 300)
    assert a0 - a == pytest.approx(saved, rel=1e-9) and b == b0
    assert with_.decode_line(8, 800) == without.decode_line(8, 800)
    assert StepCost(model, gpu, weights=with_.weights, pp=2, stage=1).weights.one_row_dense_factor == 1.2
    # the dense GEMVs' factor: a MoE or MLA model's one-token step keeps its own costs ([moe] / [mla])
    for name in ("qwen3-30b-a3b", "deepseek-v2-lite"):
        other = load_model(name)
        one = StepShape(1, 1, 300)
        assert StepCost(other, gpu, weights=with_.weights)(one) == StepCost(other, gpu, weights=base)(one)


def test_fit_one_row_makes_a_w1_step_last_what_w1_measured():
    """fit_one_row sets the factor from W1's decode rate; calibration.toml's h200_1206 is h200_mixed_graphs with it
    set from the 2026-12-06 build's 235.2 tok/s (what its source line says)."""
    from meshserve.simulator.step_cost import W1_CONTEXT, fit_one_row

    model, gpu = load_model("llama-3.1-8b"), get_gpu("H200")
    shard = stage_shard(model, Layout(), 0)
    base = load_calibration("h200_mixed_graphs")
    fitted = fit_one_row(base, 235.2, shard.weight_bytes, shard.kv_bytes_per_token, _rates(gpu))
    assert StepCost(model, gpu, weights=fitted)(StepShape(1, 1, W1_CONTEXT)) == pytest.approx(1 / 235.2, rel=1e-9)
    assert dataclasses.replace(fitted, one_row_dense_factor=None) == base
    stored = load_calibration("h200_1206")
    assert stored.one_row_dense_factor == pytest.approx(fitted.one_row_dense_factor, abs=1e-4)
    assert stored.as_tuple() == base.as_tuple()


def test_the_trace_refit_command_takes_w1_for_the_one_row_factor(capsys):
    """`python -m meshserve.simulator.step_cost TRACE --w1 TOK_S` prints one_row_dense_factor beside the fit; a
    W1 rate that is not a positive number is argparse's one-line error."""
    from meshserve.simulator.step_cost import main

    trace = RESULTS / SECTIONS["h200_mixed_graphs"][1][0]
    if not trace.exists():
        pytest.skip("step trace not in this checkout")
    assert main([str(trace), "--w1", "235.2"]) == 0
    printed = dict(line.split(" = ") for line in capsys.readouterr().out.splitlines() if " = " in line)
    assert float(printed["one_row_dense_factor"]) == pytest.approx(load_calibration("h200_1206").one_row_dense_factor,
                                                                   abs=1e-3)
    with pytest.raises(SystemExit) as exit_info:
        main([str(trace), "--w1", "-5"])
    assert exit_info.value.code == 2 and "must be > 0" in capsys.readouterr().err


def test_the_layer_cost_command_reproduces_the_stored_moe_and_mla_costs(capsys):
    """`python -m meshserve.simulator.step_cost --layer-cost moe|mla MODEL GPU TOK_S [--calibration FIT]` on the
    W1 rates calibration.toml names gives its stored floor_us / layer_us (the build now and the eleventh
    session's, with that fit's own tables); a model without such layers is one line, exit 2."""
    from meshserve.simulator.step_cost import load_mla_costs, load_moe_costs, main

    def printed(argv):
        assert main(argv) == 0
        return float(capsys.readouterr().out.splitlines()[-1].split(" = ")[1])

    assert printed(["--layer-cost", "moe", "qwen3-30b-a3b", "H200", "366.36"]) == pytest.approx(
        load_moe_costs().floor_us, abs=0.01)
    assert printed(["--layer-cost", "mla", "deepseek-v2-lite", "H200", "359.56"]) == pytest.approx(
        load_mla_costs().layer_us, abs=0.01)
    assert printed(["--layer-cost", "moe", "qwen3-30b-a3b", "H200", "252.13", "--calibration",
                    "h200_moe_1201"]) == pytest.approx(load_moe_costs("h200_moe_1201").floor_us, abs=0.01)
    with pytest.raises(SystemExit) as exit_info:
        main(["--layer-cost", "moe", "llama-3.1-8b", "H200", "200"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].endswith("llama-3.1-8b has no MoE layers")
