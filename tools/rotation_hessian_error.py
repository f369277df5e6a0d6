"""Why the residual rotation (models/rotation.py) does not help SmolLM2's int4: per projection, the int4 g32
output error relative to the weight's own, dW H dW^T / W H W^T (H: the projection's input Hessian on 4
windows of the calibration text), of round-to-nearest, act-order GPTQ and act-order GPTQ with searched static
levels, on the original model and on its Hadamard- and random-rotated copies; and diag(H)'s max / mean, how
concentrated the input's energy is in a few features (the rotation spreads it).

    PYTHONPATH=$PWD python tools/rotation_hessian_error.py [--model DIR]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from safetensors.torch import load_file

from meshserve.models.awq import fake_int4
from meshserve.models.calibration import calibration_text_ids
from meshserve.models.gptq import collect_hessians, gptq_quantize, int4_dequant
from meshserve.models.rotation import rotate_checkpoint

PROJECTIONS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj")
LAYERS = (3, 15, 27)
GROUP = 32


def relative_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    dw, w = (wq - w).double(), w.double()
    return float(torch.einsum("nk,kl,nl->", dw, h, dw) / torch.einsum("nk,kl,nl->", w, h, w))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2)")
    ns = parser.parse_args()
    if ns.model is None:
        from meshserve.models.embedded import resolve_default_model

        ns.model = str(resolve_default_model())
    ids = calibration_text_ids(ns.model, max_windows=4)
    names = sorted(f"model.layers.{i}.{p}" for i in LAYERS for p in PROJECTIONS)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"original": ns.model}
        for kind in ("hadamard", "random"):
            folders[kind] = rotate_checkpoint(ns.model, f"{tmp}/{kind}", kind)
        for label, folder in folders.items():
            hessians = collect_hessians(folder, ids, set(names))
            weights = load_file(f"{folder}/model.safetensors")
            for name in names:
                w, h = weights[f"{name}.weight"].float(), hessians[name]
                errors = {
                    "rtn": fake_int4(w, GROUP),
                    "gptq act-order": int4_dequant(gptq_quantize(w, h, GROUP, True, 1)),
                    "gptq act-order mse": int4_dequant(gptq_quantize(w, h, GROUP, True, 1, mse=True)),
                }
                diag = torch.diagonal(h)
                cells = "  ".join(f"{k} {relative_error(w, wq, h):.5f}" for k, wq in errors.items())
                print(f"{label:8s} {name[len('model.layers.'):]:22s} {cells}  diag(H) max/mean "
                      f"{float(diag.max() / diag.mean()):.1f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
