"""What the engine core imports decides what the forkserver preloads (distributed/process_start.PRELOAD): the first
core, and the server's API process with it, waits for the whole preload, so it holds only what the core needs.
A core that serves no grammar imports neither xgrammar nor transformers (issue 29: ~1.1 s of its start)."""

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


_GRAMMAR_FREE_CORE = """
import sys
from meshserve.config import EngineArgs
from meshserve.engine.core import EngineCore
from meshserve.engine.messages import EngineCoreRequest
from meshserve.engine.sampling_warmup import warm_up_sampling, warmup_cases
from meshserve.sampling import SamplingParams

core = EngineCore.from_engine_args(EngineArgs(model={model!r}, device="cpu", max_model_len=128))
runner = core.runner  # the start-up sampling warm-up (a GPU's; on the CPU too here), grammar masks included
done = warm_up_sampling(runner.model.compute_logits, runner.sampling.sampler,
                        runner.config.model_config.hf_config.hidden_size, runner.dtype, runner.vocab_size,
                        runner.device)
assert "bitmask" in done and done == [c.name for c in warmup_cases()], done


def run(rid, params):
    core.add_request(EngineCoreRequest(rid, [5, 6, 7], params, 16))
    tokens, finish = [], None
    while core.has_unfinished_requests():
        for o in core.step().outputs:
            tokens += o.new_token_ids
            finish = o.finish_reason or finish
    return tokens, finish


assert len(run("plain", SamplingParams(temperature=0.8, seed=0))[0]) == 16
print(sorted(m for m in ("xgrammar", "transformers") if m in sys.modules))
choice = SamplingParams(temperature=1.0, seed=0, structured_outputs={{"choice": ["yes", "no"]}})
tokens, finish = run("choice", choice)
assert 0 < len(tokens) < 16 and finish == "stop", (tokens, finish)  # the grammar ended it
print(sorted(m for m in ("xgrammar",) if m in sys.modules))
core.shutdown()
"""


@pytest.mark.slow  # a fresh interpreter that imports torch and runs the core (~10 s)
def test_a_core_without_grammar_requests_never_imports_xgrammar_or_transformers(tiny_model_dir):
    """The core starts, warms the grammar masks' kernel and serves a plain request without either; its first
    grammar request imports xgrammar then (on its compile thread) and is answered."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", _GRAMMAR_FREE_CORE.format(model=tiny_model_dir("llama"))],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-2:] == ["[]", "['xgrammar']"], out.stdout + out.stderr[-3000:]
