"""kernels/kv_layout.py: V's block layout in fp8 caches (MESHSERVE_FP8_V_LAYOUT), its view for torch code, and an
engine whose greedy tokens do not depend on it. The kernels in both layouts: tests/kernels/test_fp8_kv_cache.py,
test_triton_ops.py (the prologue), test_triton_decode_fused.py, test_triton_unified_attention.py."""

from __future__ import annotations

import pytest
import torch

from meshserve.kernels import kv_layout
from tests.conftest import VOCAB


def test_transposed_by_default_rows_on_request_and_for_16_bit_caches(monkeypatch):
    monkeypatch.delenv(kv_layout.ENV, raising=False)
    fp8 = torch.zeros(2, 3, 4, 2, 8, dtype=torch.float8_e4m3fn)
    assert kv_layout.v_transposed(fp8)
    monkeypatch.setenv(kv_layout.ENV, "rows")
    assert not kv_layout.v_transposed(fp8)
    monkeypatch.setenv(kv_layout.ENV, "transposed")
    assert not kv_layout.v_transposed(fp8.float())  # 16/32-bit caches keep rows order
    monkeypatch.setenv(kv_layout.ENV, "sideways")
    with pytest.raises(ValueError, match="MESHSERVE_FP8_V_LAYOUT='sideways'"):
        kv_layout.v_transposed(fp8)


def test_v_rows_is_a_view_of_the_transposed_blocks(monkeypatch):
    monkeypatch.setenv(kv_layout.ENV, "transposed")
    cache = torch.zeros(2, 3, 4, 2, 8, dtype=torch.float8_e4m3fn)
    v = kv_layout.v_rows(cache)
    assert v.shape == (3, 4, 2, 8) and v.data_ptr() == cache[1].data_ptr()
    v.view(torch.uint8)[1, 2, 1, 5] = 56  # block 1, slot 2, KV head 1, feature 5
    assert cache[1, 1].view(torch.uint8).view(2, 8, 4)[1, 5, 2] == 56  # its byte in [Hkv, D, block_size]
    assert cache[0].view(torch.uint8).sum() == 0  # K untouched
    with pytest.raises(ValueError, match="contiguous"):
        kv_layout.v_transposed(cache.transpose(1, 2))


def test_engine_tokens_do_not_depend_on_the_layout(monkeypatch, tiny_model_dir):
    # an fp8 cache on the CPU path (write_kv_ref / gather_kv_ref): prompts sharing a prefix (cache hits) and
    # several decode steps give the same greedy tokens and logprobs with V in either layout
    from meshserve import LLM, SamplingParams

    prompts = [{"prompt_token_ids": [(5 * i + s) % VOCAB for i in range(40)]} for s in (1, 1, 3)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    runs = {}
    for layout in kv_layout.LAYOUTS:
        monkeypatch.setenv(kv_layout.ENV, layout)
        llm = LLM(model=tiny_model_dir("llama"), kv_cache_dtype="fp8", block_size=16)
        runs[layout] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.shutdown()
    for rows, transposed in zip(runs["rows"], runs["transposed"]):
        assert rows.token_ids == transposed.token_ids and rows.logprobs == transposed.logprobs


def test_to_transposed_keeps_the_logical_cache(monkeypatch):
    # a rows-order cache rearranged: read through v_rows under the switch it is the same V, K untouched
    monkeypatch.setenv(kv_layout.ENV, "transposed")
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(2, 3, 4, 2, 8, generator=g) * 4).to(torch.float8_e4m3fn)
    moved = kv_layout.to_transposed(rows)
    assert torch.equal(moved[0].view(torch.uint8), rows[0].view(torch.uint8))
    assert torch.equal(kv_layout.v_rows(moved).view(torch.uint8), rows[1].view(torch.uint8))
    assert not torch.equal(moved[1].view(torch.uint8), rows[1].view(torch.uint8))
