"""The replay of a measured W3 point stays where PLANNER.md says it is (a regression anchor, not a fit)."""

from __future__ import annotations

import json

import pytest

from meshserve.simulator.validation import RESULTS, W3_H200_RUNS, measured_points, replay_w3

RUN = W3_H200_RUNS[0]


@pytest.mark.skipif(not (RESULTS / RUN.file).is_file(), reason="measured results not in this checkout")
def test_w3_qps32_matches_the_h200_measurement():
    measured = measured_points(RUN)[32.0]
    predicted = replay_w3(32.0, RUN.slo, calibration=RUN.calibration)
    assert predicted["goodput"] == pytest.approx(measured["goodput"], rel=0.05)
    assert predicted["tpot_p50"] == pytest.approx(measured["tpot_p50"], rel=0.15)
    assert predicted["itl_p50"] == pytest.approx(measured["itl_p50"], rel=0.15)


@pytest.mark.skipif(not (RESULTS / "w3_8b_slo_credit.json").is_file(), reason="measured results not in this checkout")
def test_w3_qps96_with_targets_collapses_as_measured_with_the_front_end_queue():
    """Past the API process's knee the simulated goodput falls where the measured one did (6.6 req/s), not to
    the engine-only 45 (PLANNER.md: -12%): the server of that run, before the API process's gate."""
    from meshserve.simulator.frontend import FRONTEND_BEFORE_GATE
    from meshserve.simulator.validation import frontend_of

    run = W3_H200_RUNS[2]
    assert not run.frontend_gate and frontend_of(run) == FRONTEND_BEFORE_GATE
    measured = measured_points(run)[96.0]
    predicted = replay_w3(96.0, slo=True, frontend=FRONTEND_BEFORE_GATE, calibration=run.calibration,
                          frontend_gate=False)
    assert predicted["goodput"] == pytest.approx(measured["goodput"], rel=0.25)
    assert predicted["frontend"]["busy_fraction"] > 0.95


@pytest.mark.skipif(not (RESULTS / "w3_8b_slo_graphs1024.json").is_file(), reason="measured results not in this checkout")
def test_the_default_fit_replays_the_mixed_graphs_run_below_the_knee():
    """The run whose step trace is the mixed-step graphs' fit (the default until 2026-12-06, which it replays with): goodput and TPOT p50 at QPS 32 and 48 within the issue's 10%
    (PLANNER.md: -0..-1%), with its fixed front-end latency fitted at 32 as the table does."""
    from meshserve.simulator.frontend import FRONTEND_H200
    from meshserve.simulator.validation import frontend_latency_from

    run = next(r for r in W3_H200_RUNS if r.file == "w3_8b_slo_graphs1024.json")
    assert run.calibration == "h200_mixed_graphs"
    measured = measured_points(run)
    latency = frontend_latency_from(32.0, measured[32.0]["ttft_p50"], run, FRONTEND_H200)
    for qps in (32.0, 48.0):
        predicted = replay_w3(qps, run.slo, latency, FRONTEND_H200)
        assert predicted["goodput"] == pytest.approx(measured[qps]["goodput"], rel=0.05)
        assert predicted["tpot_p50"] == pytest.approx(measured[qps]["tpot_p50"], rel=0.10)


@pytest.mark.skipif(not (RESULTS / "w1_70b_tp2_h200x2.json").is_file(), reason="measured results not in this checkout")
def test_offline_rows_stay_where_planner_md_says():
    from meshserve.simulator.validation_offline import offline_rows

    rows = {r["run"]: r for r in offline_rows()}
    for run in ("W1 llama-3.1-8b TP=1 batch 1", "W2 llama-3.1-8b TP=1"):
        assert rows[run]["pred"] == pytest.approx(rows[run]["meas"], rel=0.05)
    # TP=2 with calibration.toml's TP costs (PLANNER.md, the default fit): every row within the goal's 10%; the
    # 8B row at batch 1 a little optimistic (+4.7%), 70B a little pessimistic (-5.6%, -7.6%), this W2 (the first
    # session's, not the one fitted) -6.3%
    for run in ("W1 llama-3.1-8b TP=2 batch 1", "W1 llama-3.1-70b TP=2 batch 1", "llama-3.1-70b TP=2 decode batch 32",
                "W2 llama-3.1-8b TP=2"):
        assert rows[run]["pred"] == pytest.approx(rows[run]["meas"], rel=0.10), run
    assert rows["W1 llama-3.1-8b TP=2 batch 1"]["pred"] > rows["W1 llama-3.1-8b TP=2 batch 1"]["meas"]
    batch32 = rows["llama-3.1-70b TP=2 decode batch 32"]
    assert batch32["pred"] < 0.95 * batch32["meas"]
    assert rows["W2 llama-3.1-8b PP=2"]["pred"] is None


def replay_offline_w1_8b_tp2(tp_costs, new_tokens: int) -> float:
    """W1 8B TP=2's decode tok/s replayed with these TP costs."""
    from meshserve.simulator.config import SimConfig
    from meshserve.simulator.fleet import simulate
    from meshserve.simulator.trace import SimRequest
    from meshserve.simulator.validation_offline import _decode_tok_s

    config = SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=2, tp=2, max_model_len=4096, max_num_seqs=256,
                       calibration="h200_mixed_graphs")  # the tenth session's build
    return _decode_tok_s(simulate(config, [SimRequest(0.0, 128, new_tokens)], tp_costs=tp_costs), 1, new_tokens)


@pytest.mark.skipif(not (RESULTS / "w1_8b_tp2_h200x2.json").is_file(), reason="measured results not in this checkout")
def test_without_the_tp_costs_8b_at_tp2_misses_as_it_did():
    """The TP costs are what closes the 8B TP=2 rows: with the all-reduces alone the replays are where PLANNER.md
    had them before (+14% at batch 1, -20% for the seventh session's W2)."""
    from meshserve.bench.workloads import W1_NEW_TOKENS
    from meshserve.simulator.step_cost import TpCosts
    from meshserve.simulator.validation_offline import SEVENTH_W2, w2_tp2_seconds

    bare = replay_offline_w1_8b_tp2(TpCosts(), W1_NEW_TOKENS)
    assert bare == pytest.approx(333.94, abs=0.01)
    assert w2_tp2_seconds(TpCosts()) == pytest.approx(7.99, abs=0.01)
    measured = json.loads((RESULTS / SEVENTH_W2 / "w2_8b_tp2.json").read_text())["seconds"]
    assert measured == pytest.approx(10.01, abs=0.01)


@pytest.mark.skipif(not (RESULTS / "x2_pp_dp_int4_moe_h200_1130_s7" / "w2_8b_tp2.json").is_file(),
                    reason="measured results not in this checkout")
def test_calibration_holds_the_fit_of_w2_tp2():
    """layer_seq_us in calibration.toml is what `validation fit-tp` finds (one number, one measurement)."""
    from meshserve.simulator.step_cost import load_tp_costs
    from meshserve.simulator.validation_offline import fit_tp

    stored = load_tp_costs()
    fitted = fit_tp()
    assert fitted.layer_us == stored.layer_us == 15.9  # the profile's, not fitted
    assert fitted.layer_seq_us == pytest.approx(stored.layer_seq_us, abs=0.005)


TENTH = RESULTS / "x2_h200_1201_s10"


@pytest.mark.slow
@pytest.mark.skipif(not (TENTH / "w2_8b_pp2_d3_ho_part.json").is_file(), reason="measured results not in this checkout")
def test_pp_rows_stay_where_planner_md_says_and_in_the_measured_order():
    """W2 PP=2 with the host costs of calibration.toml (fitted to the rows marked so): every row within the goal
    (10%), and the order measured -- depth 2 slowest, then depth 3, the token hand-off, the hand-off with the
    layers 17,15 -- the order predicted (the simulator before 2026-12-01 had depth 2 faster than depth 3). Without
    the host costs the stages alone are far too fast and put depth 2 first."""
    from meshserve.simulator.validation_offline import pp_rows

    s7, s10 = "x2_pp_dp_int4_moe_h200_1130_s7/", "x2_h200_1201_s10/"
    rows = {r["file"]: r for r in pp_rows()}
    for r in rows.values():
        assert r["pred"] == pytest.approx(r["meas"], rel=0.10), r["run"]
    order = [s7 + "w2_8b_pp2.json", s7 + "w2_8b_pp2_d3.json", s10 + "w2_8b_pp2_d3_ho.json",
             s10 + "w2_8b_pp2_d3_ho_part.json"]
    for key in ("meas", "pred"):
        times = [rows[f][key] for f in order]
        assert times == sorted(times, reverse=True), key
    # the hand-off's gain over depth 3 of the same session: measured 19%, predicted 25% (the tenth session's depth
    # 3 ran 3.6% faster than the seventh's, which the fit has; PLANNER.md): both well past noise, neither a doubling
    for key in ("meas", "pred"):
        gain = 1 - rows[s10 + "w2_8b_pp2_d3_ho.json"][key] / rows[s10 + "w2_8b_pp2_d3.json"][key]
        assert 0.15 < gain < 0.30, key
    # the TP=2 row is the one the TP cost per sequence was fitted to: equal up to layer_seq_us's rounding
    tp2 = rows[s7 + "w2_8b_tp2.json"]
    assert tp2["pred"] == pytest.approx(tp2["meas"], rel=0.005)
    bare = {r["file"]: r for r in pp_rows(host=(0.0, 0.0))}
    d2, d3 = bare[s7 + "w2_8b_pp2.json"], bare[s7 + "w2_8b_pp2_d3.json"]
    assert d2["pred"] < 0.7 * d2["meas"] and d2["pred"] < d3["pred"]


@pytest.mark.skipif(not (TENTH / "w1_8b_tp2_fused_pull.json").is_file(), reason="measured results not in this checkout")
def test_w1_tp2_with_the_fused_norm_kernel_within_the_goal_and_in_order():
    """W1 8B of the tenth session: TP=1, TP=2, TP=2 with the fused all-reduce + norm (pull, push) within 10%, each
    faster than the last in both columns; the fused kernels' gain over one-shot within 2 points of measured."""
    from meshserve.simulator.validation_offline import tenth_w1_rows

    rows = tenth_w1_rows()
    for r in rows:
        assert r["pred"] == pytest.approx(r["meas"], rel=0.10), r["run"]
    for key in ("pred", "meas"):
        assert [r[key] for r in rows] == sorted(r[key] for r in rows), key
    plain = rows[1]
    for fused in rows[2:]:
        assert fused["pred"] / plain["pred"] == pytest.approx(fused["meas"] / plain["meas"], abs=0.02)


@pytest.mark.slow
@pytest.mark.skipif(not (TENTH / "w3_dp2r" / "w3.json").is_file(), reason="measured results not in this checkout")
def test_dp2_at_qps128_internal_back_end_holds_and_the_router_collapses():
    """W3 DP=2 of the tenth session at QPS 128: the internal back end (no router process) serves 104.8 req/s of
    goodput, predicted within 10%; through the router process (its CPU costs from router_calibration.toml, not
    fitted here) goodput collapses below 15 req/s, predicted so, with the router saturated."""
    from meshserve.simulator.router_node import load_router_costs
    from meshserve.simulator.validation import replay_w3_dp

    internal = json.loads((TENTH / "w3_dp2" / "w3.json").read_text())["points"]
    routed = json.loads((TENTH / "w3_dp2r" / "w3.json").read_text())["points"]
    meas_internal = next(p for p in internal if p["qps"] == 128.0)
    meas_routed = next(p for p in routed if p["qps"] == 128.0)
    pred_internal = replay_w3_dp(128.0)
    pred_routed = replay_w3_dp(128.0, load_router_costs("cpu_light"))
    assert pred_internal["goodput"] == pytest.approx(meas_internal["goodput"], rel=0.10)
    assert pred_routed["goodput"] < 15 and meas_routed["goodput"] < 15
    assert pred_routed["router_node"]["busy_fraction"] > 0.95


@pytest.mark.skipif(not (RESULTS / "w3_8b_slo_api4_h200_1130.json").is_file(), reason="measured results not in this checkout")
def test_step_noise_brings_goodput_past_the_knee_to_the_4_api_process_run():
    """The run the default fit's step noise comes from, at QPS 96 (PLANNER.md): without noise the GPU is never
    idle and goodput runs ~8% high; the host gaps leave it ~96% busy, as measured, and goodput within 5%."""
    from meshserve.simulator.frontend import FRONTEND_H200

    run = next(r for r in W3_H200_RUNS if r.file == "w3_8b_slo_api4_h200_1130.json")
    assert run.api_server_count == 4 and run.slo
    measured = measured_points(run)[96.0]
    same = {"frontend": FRONTEND_H200, "calibration": run.calibration, "api_server_count": 4}
    off = replay_w3(96.0, run.slo, **same)
    on = replay_w3(96.0, run.slo, step_noise=True, **same)
    assert off["goodput"] > 1.05 * measured["goodput"] and off["gpu_busy_fraction"] > 0.99
    assert on["goodput"] == pytest.approx(measured["goodput"], rel=0.05)
    assert 0.94 < on["gpu_busy_fraction"] < 0.98


@pytest.mark.skipif(not (RESULTS / "w3_8b_slo_api1_h200_1130s7.json").is_file(), reason="measured results not in this checkout")
def test_one_api_process_holds_goodput_at_twice_the_knee_as_measured():
    """The seventh session's run (PLANNER.md), one API process at QPS 128: the API process's gate refuses most
    of the excess before parsing, so goodput stays the GPU's (52.6 req/s measured); goodput, ITL p50 within 10%
    and TTFT p99 within 20%, with the fixed latency of the same server setting as the table has it. TTFT p50 is
    a known miss (+21% in PLANNER.md's table since the front-end refit of 2026-12-02, +27% before: the
    simulated queue runs longer than the server's)."""
    from meshserve.simulator.frontend import FRONTEND_H200
    from meshserve.simulator.validation import _prefill_chunk, fixed_latency_of

    run = next(r for r in W3_H200_RUNS if r.file == "w3_8b_slo_api1_h200_1130s7.json")
    assert run.api_server_count == 1 and run.frontend_gate and _prefill_chunk(run) == 1024
    assert run.latency_of == "targets, mixed-step graphs"
    measured = measured_points(run)[128.0]
    latency = fixed_latency_of(run.latency_of)
    predicted = replay_w3(128.0, run.slo, latency, FRONTEND_H200, slo_prefill_chunk=_prefill_chunk(run))
    for metric, bound in (("goodput", 0.10), ("itl_p50", 0.15), ("ttft_p99", 0.20)):
        assert predicted[metric] == pytest.approx(measured[metric], rel=bound), metric
    assert predicted["frontend"]["gate_refusals"] > 1000
    assert predicted["ttft_p50"] > 1.15 * measured["ttft_p50"]  # the known miss: if this fails, update PLANNER.md


@pytest.mark.slow
def test_every_tenth_session_row_states_its_goal():
    """PLANNER.md's tenth-session table: each row predicted, measured, error and met/missed against the issue's
    bound for its metric; the W3 rows with the fixed latency of the same server setting (not fitted to them)."""
    import re

    from meshserve.simulator.validation_offline import tenth_table

    rows = [line.split(" | ") for line in tenth_table().splitlines()[2:]]
    assert len(rows) > 20
    for cells in rows:
        pred, meas = (float(c.replace(",", "")) for c in cells[2:4])
        err = float(cells[4].rstrip("%")) / 100  # of the unrounded values: the cells are rounded for print
        digits = len(cells[3].partition(".")[2])
        slack = 0.002 + 10.0 ** -digits / abs(meas)
        m = re.fullmatch(r"(met|missed) \(within (\d+)%\)", cells[5])
        assert m is not None and err == pytest.approx((pred - meas) / meas, abs=slack)
        bound = int(m.group(2)) / 100
        assert (m.group(1) == "met") == (abs(err) <= bound) or abs(abs(err) - bound) < 0.002
    w3 = [c for c in rows if c[0].startswith("W3")]
    assert all("fixed latency 12 ms" in c[6] for c in w3)


@pytest.mark.slow  # ~25 s: 30 s of W3 at QPS 384 through the scheduler
def test_qwen_peak_replays_within_the_goals_with_its_own_fit():
    """The fifteenth session's Qwen3-0.6B peak (max_num_seqs 1024, QPS 384: 227.7 req/s, TTFT p50 895 ms, TPOT p50
    8.6 ms) replayed with h200_qwen3_0_6b (the 8B's weights said ~179 req/s): PLANNER.md "Issue 28: W3 on
    Qwen3-0.6B"."""
    from meshserve.simulator import validation_qwen as vq

    run = vq.QWEN_RUNS[1]
    meas = measured_points(run)[384.0]
    pred = vq.replay(384.0, run.max_num_seqs)
    assert pred["calibration"] == "h200_qwen3_0_6b"
    for metric in ("goodput", "ttft_p50", "tpot_p50", "ttft_p99", "tpot_p99"):
        assert pred[metric] == pytest.approx(meas[metric], rel=vq.QWEN_GOALS[metric]), metric


@pytest.mark.slow  # ~4 s a point
@pytest.mark.parametrize("qps", [256.0, 384.0])
def test_qwen_out_of_sample_run_with_a_gpu_bound_core_replays_within_the_goals(qps):
    """The twenty-second session's W3 (benchmarks/results/h200_1202_s22/w3_core_timing/: 232.3 / 231.3 req/s),
    whose steps the fit never saw, replayed as PLANNER.md's table does (the fixed latency fitted at QPS 64): all
    five goals. Its engine core waited for the GPU in > 99% of the knee's steps, which ran 0.95x the fit
    (tools/step_fit_windows.py); the twenty-first session's host-bound core ran them 1.12x and missed."""
    from meshserve.simulator import validation_qwen as vq

    run = next(r for r in vq.QWEN_RUNS if r.file.startswith("h200_1202_s22/"))
    meas = measured_points(run)[qps]
    pred = vq.replay(qps, run.max_num_seqs, vq.fixed_latency())
    for metric in vq.METRICS:
        assert pred[metric] == pytest.approx(meas[metric], rel=vq.QWEN_GOALS[metric]), metric


@pytest.mark.slow  # ~4 s a point
def test_qwen_chunk_0_replays_below_chunk_1024_as_measured_with_the_eager_steps_costs(monkeypatch):
    """The twenty-third session's back-to-back pair at QPS 256 (benchmarks/results/h200_1202_s23/): the prompt
    budget --slo-prefill-chunk 0 served 180.3 req/s, the default 1,024 232.3. Without the eager steps' costs
    (eager_steps.py) the replay said chunk 0 serves more than 1,024 (its 8,192-token steps priced as the graphed
    ones, no host time before them); with them it says less, goodput and TPOT p50 near the measured."""
    from meshserve.simulator import fleet
    from meshserve.simulator import validation_qwen as vq

    run = next(r for r in vq.QWEN_RUNS if r.file.startswith("h200_1202_s23/") and r.prefill_chunk == 0)
    meas = measured_points(run)[256.0]
    latency = vq.fixed_latency()
    chunk_1024 = vq.replay(256.0, run.max_num_seqs, latency)
    chunk_0 = vq.replay(256.0, run.max_num_seqs, latency, prefill_chunk=0)
    assert chunk_0["goodput"] < chunk_1024["goodput"]
    assert chunk_0["goodput"] == pytest.approx(meas["goodput"], rel=0.15)
    assert chunk_0["tpot_p50"] == pytest.approx(meas["tpot_p50"], rel=vq.QWEN_GOALS["tpot_p50"])
    monkeypatch.setattr(fleet, "load_eager_costs", lambda fit: None)
    assert vq.replay(256.0, run.max_num_seqs, latency, prefill_chunk=0)["goodput"] > chunk_1024["goodput"]


@pytest.mark.skipif(not (RESULTS / "h200_1203_s26").is_dir(), reason="measured results not in this checkout")
def test_one_gpu_w2_by_dtype_stays_where_planner_md_says():
    """W2 on one H200 with bf16 and fp8 caches and fp8 weights (validation_offline.ONE_GPU_W2), Qwen3-0.6B by its
    balanced-kernel fit ([h200_qwen3_0_6b_balanced]): every row within the goal's 10%, the fitted one on its
    measurement, the KV pool the planner's memory model gives within 0.5% of the engine's for every dtype; except
    the fp8-cache Qwen rows of the builds before 2026-12-05 (twenty-sixth to thirty-ninth sessions), 14-17%
    optimistic: that workload ran 5.38-5.58 s then and 4.57-4.70 s in the fiftieth session's build, which the
    simulation models (-0.2%)."""
    from meshserve.simulator.validation_offline import one_gpu_w2_rows

    rows = one_gpu_w2_rows()
    assert len(rows) == 15 and sum(r["fitted"] for r in rows) == 1
    older_fp8_kv = [r for r in rows if "qwen3-0.6b, bf16 weights, fp8 KV" in r["run"] and "fiftieth" not in r["run"]]
    assert len(older_fp8_kv) == 3
    for r in rows:
        if r in older_fp8_kv:
            assert 0.82 < r["pred"] / r["meas"] < 0.90, r["run"]
        else:
            assert r["pred"] == pytest.approx(r["meas"], rel=0.005 if r["fitted"] else 0.10), r["run"]
        assert r["pred_blocks"] == pytest.approx(r["meas_blocks"], rel=0.005), r["run"]
    latest = [r for r in rows if "fiftieth" in r["run"]]
    assert len(latest) == 4 and all(abs(r["pred"] / r["meas"] - 1) < 0.08 for r in latest)


@pytest.mark.skipif(not (RESULTS / "h100_1205_s47").is_dir(), reason="measured results not in this checkout")
def test_w2_on_an_h100_within_the_goal_by_its_own_fits_and_not_by_the_h200s():
    """W2 on one H100 (validation_offline.ONE_H100_W2): by the H100's own fits (the same lease's decode curves and
    the decode kernel's measured KV rate; W2 out of sample) within the goal's 10% (-4.1%, -3.5%); by the model's
    H200 fit carried by the data sheet, the 8B's +12% pessimistic miss PLANNER.md explains, and Qwen3-0.6B's +1%
    since its H200 fit takes the balanced decode kernel's KV factor (1.17, the H100's own 1.15: the kernel reads
    the same share of either GPU's bandwidth); the KV pool within 0.5%."""
    from meshserve.simulator.validation_offline import one_h100_w2_rows

    rows = one_h100_w2_rows()
    assert len(rows) == 2
    for r in rows:
        assert r["pred"] == pytest.approx(r["meas"], rel=0.05), r["run"]
        low, high = (1.10, 1.15) if "llama" in r["run"] else (0.97, 1.05)
        assert low < r["pred_h200_fit"] / r["meas"] < high, r["run"]
        assert r["h200_fit"].startswith("h200_")
        assert r["pred_blocks"] == pytest.approx(r["meas_blocks"], rel=0.005), r["run"]


@pytest.mark.skipif(not (RESULTS / "h200_1202_s18").is_dir(), reason="measured results not in this checkout")
def test_moe_and_mla_rows_stay_where_planner_md_says():
    """Qwen3-30B-A3B and DeepSeek-V2-Lite on one GPU (validation_offline.MOE_ONE_GPU): the four fitted W1 rows (two
    builds, each with its own [moe] / [mla] costs) on their measurement, every check within the goal's 10%:
    V2-Lite's W2 optimistic (-1.0..-5.8%), the H100's W1 (fitted on the H200's) +4.2%."""
    from meshserve.simulator.validation_offline import moe_rows

    rows = moe_rows()
    assert sum(r["fitted"] for r in rows) == 4 and len(rows) == 12
    for r in rows:
        assert r["pred"] == pytest.approx(r["meas"], rel=0.001 if r["fitted"] else 0.10), r["run"]
    v2 = [r for r in rows if "W2 deepseek" in r["run"]]
    assert all(r["pred"] < r["meas"] for r in v2)
    # the eleventh session's build on today's costs would miss by far: its pin is what keeps it on its measurement
    old = [r for r in rows if "eleventh" in r["run"]]
    assert {r["fit"] for r in old} == {"h200_moe_1201"}
    h100 = next(r for r in rows if r["gpu"] == "H100-SXM" and r["metric"] == "decode tok/s")
    assert 1.02 < h100["pred"] / h100["meas"] < 1.07
