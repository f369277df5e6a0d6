"""Do step-time fits travel between GPU kinds? (PLANNER.md, "W2 on an H100: the H200's fits by the data sheet, and
the H100's own".) For each model: fit the H200's and the H100's decode curves (step_cost.fit_curve_weights, the KV
factor fixed at each GPU's measured decode-kernel read rate), then price W2 with each fit on its own GPU and with
each GPU's fit carried to the other by the data sheet, against the W2 measured on each (the H200's pair is
from an older build than the H100's: read the H100 -> H200 line with that in mind).

usage: python tools/calibration_transfer.py
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshserve.bench.workloads import w2_requests
from meshserve.engine.step_time import DeviceRates
from meshserve.planner.hardware import get_gpu
from meshserve.planner.memory import stage_shard
from meshserve.planner.model import load_model
from meshserve.planner.parallel import Layout
from meshserve.simulator.step_cost import calibration_for, curve_points, fit_curve_weights, load_calibration
from meshserve.simulator.validation import RESULTS
from meshserve.simulator.validation_offline import replay_offline

# model: {gpu: (decode curve, W2 JSON, the decode kernel's measured KV read rate TB/s)}, each GPU's pair from one
# session: the H200's the twenty-fifth (BENCHMARKS.md: the GQA bf16 kernel at 3.96 TB/s at batch 256), the H100's
# the forty-seventh (profile_kernels.py at batch 224: 2.89 / 2.92 TB/s)
RUNS = {
    "llama-3.1-8b": {
        "H200": ("h200_1203_s25/call4_8b_vs_vllm/ms_curve_llama-3.1-8b.json",
                 "h200_1203_s25/call4_8b_vs_vllm/ms_w2_llama-3.1-8b.json", 3.96),
        "H100-SXM": ("h100_1205_s47/llama/ms_curve_llama-3.1-8b.json", "h100_1205_s47/llama/ms_w2_llama-3.1-8b.json",
                     2.89),
    },
    "qwen3-0.6b": {
        "H200": ("h200_1203_s25/call3_qwen_vs_vllm/ms_curve_qwen3-0.6b.json",
                 "h200_1203_s25/call3_qwen_vs_vllm/ms_w2_qwen3-0.6b.json", 3.96),
        "H100-SXM": ("h100_1205_s47/qwen/ms_curve_qwen3-0.6b.json", "h100_1205_s47/qwen/ms_w2_qwen3-0.6b.json", 2.92),
    },
}


def w2_seconds(model: str, gpu: str, weights) -> float:
    reqs = [(len(r.prompt_token_ids), r.max_tokens) for r in w2_requests()]
    return replay_offline(model, 1, reqs, gpu=gpu, weights=weights)["duration_s"]


def main() -> None:
    for model, runs in RUNS.items():
        shard = stage_shard(load_model(model), Layout(), 0)
        mixed_ms = load_calibration(calibration_for("default", model, "H200")).mixed_ms
        fits, measured = {}, {}
        for gpu_name, (curve, w2, kv_tb_s) in runs.items():
            gpu = get_gpu(gpu_name)
            points, context = curve_points(json.loads((RESULTS / curve).read_text()))
            fits[gpu_name], err = fit_curve_weights(points, context, shard.weight_bytes, shard.kv_bytes_per_token,
                                                    DeviceRates(gpu.hbm_bytes_per_s, gpu.flops_per_s("bf16")),
                                                    gpu.hbm_bytes_per_s / (kv_tb_s * 1e12), mixed_ms)
            measured[gpu_name] = json.loads((RESULTS / w2).read_text())["seconds"]
            w = fits[gpu_name]
            print(f"{model} {gpu_name} curve fit: constant {w.constant_ms:.3f} ms, dense {w.dense_factor:.3f}, kv "
                  f"{w.kv_factor:.3f}, seq {w.seq_us:.2f} us (curve error {err:.1%})")
        for fit_gpu, gpu_name in (("H200", "H200"), ("H100-SXM", "H100-SXM"), ("H200", "H100-SXM"),
                                  ("H100-SXM", "H200")):
            pred = w2_seconds(model, gpu_name, fits[fit_gpu])
            print(f"  W2 on {gpu_name} by the {fit_gpu} fit: {pred:.2f} s against {measured[gpu_name]:.2f} "
                  f"({pred / measured[gpu_name] - 1:+.1%})")


if __name__ == "__main__":
    main()
