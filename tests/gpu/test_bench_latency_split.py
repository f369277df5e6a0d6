"""bench latency's split of a W1 token (bench/offline.py): the batch-1 decode graph's device time, replayed
back to back, is positive and no longer than the wall time of a decode token of the same engine."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_decode_graph_time_fits_inside_a_decode_token():
    from meshserve import LLM, SamplingParams
    from meshserve.bench import offline

    llm = LLM(model="qwen3-0.6b", load_format="dummy", dtype="bfloat16", max_model_len=1024,
              hf_overrides={"num_hidden_layers": 3}, gpu_memory_utilization=0.3, max_num_seqs=8, seed=0)
    prompt = [{"prompt_token_ids": list(range(1, 129))}]

    def gen(n):
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)

    gen(8)
    t1, tn = offline._timed(lambda: gen(1)), offline._timed(lambda: gen(129))
    token_ms = 1e3 * (tn - t1) / 128
    graph_ms = offline._decode_graph_ms(llm, 256)
    assert graph_ms is not None and 0 < graph_ms <= token_ms * 1.05
    llm.shutdown()
