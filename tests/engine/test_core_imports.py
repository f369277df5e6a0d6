"""What the engine core imports decides what the forkserver preloads (distributed/process_start.PRELOAD): the first
core, and the server's API process with it, waits for the whole preload, so it holds only what the core needs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

_CORE_RUN = """
import sys
from meshserve import LLM, SamplingParams
llm = LLM({model!r}, device="cpu", max_model_len=128)
out = llm.generate(["hello world"], SamplingParams(max_tokens=3, temperature=0.0))
assert len(out[0].outputs[0].token_ids) == 3, out
llm.shutdown()
print(sorted(m for m in ("torch.distributed.tensor", "sympy", "torch._dynamo") if m in sys.modules))
"""


@pytest.mark.slow  # a fresh interpreter that imports torch and runs the engine (~10 s)
def test_the_engine_core_needs_no_torch_distributed_tensor_so_the_forkserver_does_not_preload_it(tiny_model_dir):
    from meshserve.distributed.process_start import PRELOAD

    assert "torch.distributed.tensor" not in PRELOAD
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", _CORE_RUN.format(model=tiny_model_dir("llama"))],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # a change that imports one of these in the core: it costs the core's start either way; preload it instead
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr[-3000:]
