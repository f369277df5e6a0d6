"""The vLLM peer's bench (../shared/tools/vllm-peer/bench.py, staged as .vp4/bench.py) with meshserve's dummy
weights' distribution instead of vLLM's, for MoE models.

usage (device, vLLM staged by tools/vllm_stage.sh; the same arguments as bench.py):
  . .vp4/env.sh; VLLM_ALLOW_INSECURE_SERIALIZATION=1 python3 tools/vllm_reinit_bench.py .vp4/bench.py \
      .vp4/deepseek-v2-lite w2,curve

Why: vLLM's dummy loader draws every parameter uniform in [-1e-3, 1e-3] from one seed (1234) for all of them
(weight_utils.initialize_dummy_weights: "the random values ... only depend on the parameter's number of
elements and its data type"), so every layer's router, and every RMSNorm weight, is the same tiny draw;
meshserve's (models/loader.py) draws each tensor N(0, 0.02) from a seed of its name, norms 1. A MoE step's
cost depends on how many experts its tokens pick, so the two engines' dummy models are not the same workload
unless their routers are drawn alike. After vLLM has built and loaded the model (and captured its graphs, which
keep the same storage), every floating-point parameter is redrawn in place as meshserve draws it: matrices
N(0, 0.02), 1-D tensors 1 (norm weights) or 0 (biases, correction biases). Buffers derived at load time (MLA's
absorbed up-projections) keep vLLM's draw: their values do not change the work.
"""

import runpy
import sys

import torch


def reinit(model: torch.nn.Module) -> int:
    """Redraw model's parameters in place (module docstring); returns how many were redrawn."""
    gen = torch.Generator(device=next(model.parameters()).device)
    count = 0
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if not torch.is_floating_point(p) or torch.finfo(p.dtype).bits < 16:
                continue
            if p.dim() >= 2:
                gen.manual_seed(1_000_003 + i)
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(0.0 if "bias" in name else 1.0)
            count += 1
    return count


def main() -> None:
    bench = sys.argv[1]
    import vllm

    base = vllm.LLM

    class LLM(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            print("REINIT parameters redrawn:", self.apply_model(reinit), flush=True)

    vllm.LLM = LLM  # bench.py imports LLM from vllm inside its main()
    sys.argv = [bench, *sys.argv[2:]]
    runpy.run_path(bench, run_name="__main__")


if __name__ == "__main__":
    main()
