"""The kernel choice is made once, from the config (and two documented environment overrides)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig

from meshserve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from meshserve.errors import InvalidArgumentError
from meshserve.kernels.fused import fused_ops_importable, gemv_importable
from meshserve.layers import backend_selection
from meshserve.layers.attention import Attention, TorchAttentionBackend
from meshserve.layers.backend_selection import PLAIN, KernelSelection, bind_kernels, select_kernels
from meshserve.models.llama import LlamaForCausalLM


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS", raising=False)
    monkeypatch.delenv("MESHSERVE_NORM_GEMV", raising=False)
    monkeypatch.delenv("MESHSERVE_DECODE_CONTEXT_BOUNDS", raising=False)
    monkeypatch.delenv("MESHSERVE_DECODE_SAMPLE_GRAPHS", raising=False)
    monkeypatch.delenv("MESHSERVE_PDL_HEAD", raising=False)
    monkeypatch.delenv("MESHSERVE_GREEDY_ARGMAX", raising=False)
    monkeypatch.delenv("MESHSERVE_MLA_PREFILL_REF", raising=False)
    for name in ("MESHSERVE_PDL", "MESHSERVE_PDL_TRIGGER", "MESHSERVE_PDL_ONE_WAVE", "MESHSERVE_PDL_PRELOAD",
                 "MESHSERVE_PDL_MOE", "MESHSERVE_MOE_LEGACY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("MESHSERVE_MLA_LEGACY", "MESHSERVE_MLA_DECODE_TILE", "MESHSERVE_MLA_BALANCED", "MESHSERVE_MLA_PREFETCH",
                 "MESHSERVE_MLA_TRANSPOSED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MESHSERVE_DECODE_FP8_PATH", raising=False)
    monkeypatch.delenv("MESHSERVE_DECODE_GRID_TILE", raising=False)
    monkeypatch.delenv("MESHSERVE_DECODE_BALANCED", raising=False)
    monkeypatch.delenv("MESHSERVE_DECODE_SPLIT_TOKENS", raising=False)
    monkeypatch.delenv("MESHSERVE_DECODE_MIN_SPLITS", raising=False)
    for name in ("MESHSERVE_FP8_GEMV", "MESHSERVE_FP8_GEMM", "MESHSERVE_DECODE_GEMM", "MESHSERVE_INT4_GEMV", "MESHSERVE_SKINNY_GEMV", "MESHSERVE_MOE_CONFIGS",
                 "MESHSERVE_MOE_ROUTE_ALIGN", "MESHSERVE_MOE_FUSE_SHARED", "MESHSERVE_MOE_ROUTER_FUSED"):
        monkeypatch.delenv(name, raising=False)


def _config(device="cpu", dtype="float32", cache_dtype="auto", enforce_eager=False) -> EngineConfig:
    mc = ModelConfig(model="tiny", tokenizer="", hf_config=None, dtype=dtype, max_model_len=64)
    return EngineConfig(mc, CacheConfig(cache_dtype=cache_dtype), SchedulerConfig(), ParallelConfig(),
                        device=device, enforce_eager=enforce_eager)


def test_cpu_takes_the_plain_path_with_the_model_dtype_cache():
    sel = select_kernels(_config(dtype="bfloat16"))
    assert sel == KernelSelection(kv_cache_dtype=torch.bfloat16)
    assert sel.attention_backend == "torch" and not sel.cuda_graphs


def test_cuda_takes_every_fast_path_that_imports():
    # decided from the config alone: no GPU is touched
    sel = select_kernels(_config(device="cuda:0", dtype="bfloat16"))
    assert sel.attention_backend == "triton" and sel.cuda_graphs
    assert sel.fused_ops == sel.fused_prologue == sel.fused_sampler == fused_ops_importable()
    assert sel.gemv == gemv_importable()
    # opt-in until measured on the H200 (issue 29)
    assert not sel.norm_gemv and sel.decode_context_bounds == ()
    eager = select_kernels(_config(device="cuda", enforce_eager=True))
    assert not eager.cuda_graphs and eager.decode_context_bounds == ()


def test_fixed_cost_switches(monkeypatch):
    # the norm fold and the short decode-graph variants, each turned on by its own switch (bench on vs off)
    gpu = _config(device="cuda", dtype="bfloat16")
    monkeypatch.setenv("MESHSERVE_NORM_GEMV", "1")
    sel = select_kernels(gpu)
    assert sel.norm_gemv == (sel.gemv and sel.fused_ops) and sel.decode_context_bounds == ()
    monkeypatch.setenv("MESHSERVE_NORM_GEMV", "0")
    monkeypatch.setenv("MESHSERVE_DECODE_CONTEXT_BOUNDS", "none")
    sel = select_kernels(gpu)
    assert not sel.norm_gemv and sel.decode_context_bounds == ()
    assert sel.gemv == gemv_importable() and sel.cuda_graphs  # the rest stays
    monkeypatch.setenv("MESHSERVE_DECODE_CONTEXT_BOUNDS", "1024, 512,1024")
    assert select_kernels(gpu).decode_context_bounds == (512, 1024)
    for bad in ("short", "0,256"):
        monkeypatch.setenv("MESHSERVE_DECODE_CONTEXT_BOUNDS", bad)
        with pytest.raises(ValueError, match="MESHSERVE_DECODE_CONTEXT_BOUNDS"):
            select_kernels(gpu)


def test_short_context_graphs_by_default_for_small_models(monkeypatch):
    """Short-context decode-graph variants are on by default where a batch-1 step is launch-bound (hidden size <=
    2,048: pdl.auto_enables' rule; dense or MoE), off for larger models, MLA models and off the GPU; the switch
    overrides."""
    import dataclasses
    import types

    def gpu(hidden, experts=0, kv_lora_rank=None):
        hf = types.SimpleNamespace(hidden_size=hidden, num_local_experts=experts, kv_lora_rank=kv_lora_rank)
        config = _config(device="cuda", dtype="bfloat16")
        return dataclasses.replace(config, model_config=dataclasses.replace(config.model_config, hf_config=hf))

    assert select_kernels(gpu(1024)).decode_context_bounds == (256, 1024)
    assert select_kernels(gpu(4096)).decode_context_bounds == ()
    assert select_kernels(gpu(2048, experts=128)).decode_context_bounds == (256, 1024)
    assert select_kernels(gpu(2048, experts=64, kv_lora_rank=512)).decode_context_bounds == ()
    assert select_kernels(dataclasses.replace(gpu(1024), enforce_eager=True)).decode_context_bounds == ()
    monkeypatch.setenv("MESHSERVE_DECODE_CONTEXT_BOUNDS", "0")
    assert select_kernels(gpu(1024)).decode_context_bounds == ()
    monkeypatch.setenv("MESHSERVE_DECODE_CONTEXT_BOUNDS", "512")
    assert select_kernels(gpu(4096)).decode_context_bounds == (512,)


def test_norm_fold_by_default_for_small_dense_models(monkeypatch):
    """The batch-1 norm fold is on by default where the short-context graphs are (dense, hidden size <= 2,048, with
    the GEMV and the fused ops), off for larger or MoE models; MESHSERVE_NORM_FOLD=0/1 overrides either way."""
    import dataclasses
    import types

    from meshserve.layers import backend_selection

    monkeypatch.setattr(backend_selection, "gemv_importable", lambda: True)
    monkeypatch.setattr(backend_selection, "fused_ops_importable", lambda: True)

    def gpu(hidden, experts=0):
        hf = types.SimpleNamespace(hidden_size=hidden, num_local_experts=experts)
        config = _config(device="cuda", dtype="bfloat16")
        return dataclasses.replace(config, model_config=dataclasses.replace(config.model_config, hf_config=hf))

    monkeypatch.delenv("MESHSERVE_NORM_FOLD", raising=False)
    assert select_kernels(gpu(1024)).norm_fold
    assert not select_kernels(gpu(4096)).norm_fold
    assert not select_kernels(gpu(2048, experts=128)).norm_fold
    monkeypatch.setenv("MESHSERVE_NORM_FOLD", "0")
    assert not select_kernels(gpu(1024)).norm_fold
    monkeypatch.setenv("MESHSERVE_NORM_FOLD", "1")
    assert select_kernels(gpu(4096)).norm_fold
    monkeypatch.setenv("MESHSERVE_DISABLE_FUSED_OPS", "1")
    assert not select_kernels(gpu(1024)).norm_fold


def test_sampled_decode_graphs_up_to_batch_8_by_default(monkeypatch):
    """The greedy-head decode graphs: batch sizes up to 8 with CUDA graphs, none without; the switch sets the
    largest batch (0: off) and refuses what is not a non-negative count."""
    gpu = _config(device="cuda", dtype="bfloat16")
    assert select_kernels(gpu).decode_sample_graph_max_bs == 8
    assert select_kernels(_config()).decode_sample_graph_max_bs == 0
    assert select_kernels(_config(device="cuda", enforce_eager=True)).decode_sample_graph_max_bs == 0
    monkeypatch.setenv("MESHSERVE_DECODE_SAMPLE_GRAPHS", "0")
    assert select_kernels(gpu).decode_sample_graph_max_bs == 0
    monkeypatch.setenv("MESHSERVE_DECODE_SAMPLE_GRAPHS", "2")
    assert select_kernels(gpu).decode_sample_graph_max_bs == 2
    assert select_kernels(gpu).sample_head_pdl  # the head as the PDL switch says, unless MESHSERVE_PDL_HEAD=0
    monkeypatch.setenv("MESHSERVE_PDL_HEAD", "0")
    assert not select_kernels(gpu).sample_head_pdl
    monkeypatch.delenv("MESHSERVE_PDL_HEAD")
    for bad in ("all", "-1"):
        monkeypatch.setenv("MESHSERVE_DECODE_SAMPLE_GRAPHS", bad)
        with pytest.raises(ValueError, match="MESHSERVE_DECODE_SAMPLE_GRAPHS"):
            select_kernels(gpu)


def test_skinny_gemv_is_opt_in_and_needs_the_gemv(monkeypatch):
    # a speculative verify step's few rows through the Triton skinny GEMV: opt-in until measured (issue 22)
    gpu = _config(device="cuda", dtype="bfloat16")
    assert not select_kernels(gpu).skinny_gemv
    monkeypatch.setenv("MESHSERVE_SKINNY_GEMV", "1")
    assert select_kernels(gpu).skinny_gemv == gemv_importable()
    assert not select_kernels(_config(dtype="bfloat16")).skinny_gemv  # CPU: the plain path
    monkeypatch.setenv("MESHSERVE_DISABLE_FUSED_OPS", "1")
    assert not select_kernels(gpu).skinny_gemv
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS")
    monkeypatch.setenv("MESHSERVE_SKINNY_GEMV", "0")
    assert not select_kernels(gpu).skinny_gemv


def test_pdl_switch_is_opt_in_for_cuda_and_bound_for_the_process(monkeypatch):
    from meshserve.kernels import pdl

    gpu = _config(device="cuda", dtype="bfloat16")
    assert not select_kernels(gpu).pdl  # auto by default: a config without a hidden size keeps it off
    monkeypatch.setenv("MESHSERVE_PDL", "1")
    on = select_kernels(gpu)
    assert on.pdl and not select_kernels(_config()).pdl  # never on CPU
    model = torch.nn.Linear(2, 2)
    with pdl.enabled(False):
        bind_kernels(model, on)
        assert pdl.is_enabled()
        bind_kernels(model, PLAIN)
        assert not pdl.is_enabled()


def _model_config(hidden_size: int | None, device="cuda", **hf_fields) -> EngineConfig:
    from types import SimpleNamespace

    config = _config(device=device, dtype="bfloat16")
    hf = SimpleNamespace(hidden_size=hidden_size, **hf_fields) if hidden_size is not None else None
    return dataclasses.replace(config, model_config=dataclasses.replace(config.model_config, hf_config=hf))


def test_pdl_auto_by_hidden_size_and_variants(monkeypatch):
    from meshserve.kernels.pdl import PdlPolicy

    # auto, the default: on for Qwen3-0.6B's 1,024 (+25% W1 on an H200) and MoE models of 2,048 (Qwen3-30B-A3B
    # +10.7%) in every decode step; for Llama-3.1-8B's 4,096 in one-row decode steps without the partial-row
    # preload (+3.7%; -9% in every decode step with it), with fp8 weights too; off for larger MoE
    # models, an unknown size, and CPU
    for mode in ("", "auto"):
        monkeypatch.setenv("MESHSERVE_PDL", mode)
        for hidden in (1024, 2048):
            policy = select_kernels(_model_config(hidden)).pdl_policy
            assert policy == PdlPolicy(enabled=True, preload="all", steps="decode")
        large = select_kernels(_model_config(4096)).pdl_policy
        assert large == PdlPolicy(enabled=True, preload="row", steps="one")
        # per-channel fp8 weights, online or from the checkpoint, and AWQ / GPTQ int4: the same one-row rule (their
        # GEMVs wait on PDL; W1 fp8 +4.4%, int4 +8.3%); fp8 blocks stay plain (not measured)
        fp8_checkpoint = _model_config(4096, quantization_config={"quant_method": "fp8"})
        assert select_kernels(fp8_checkpoint).pdl_policy == PdlPolicy(enabled=True, preload="row", steps="one")
        fp8 = _model_config(4096)
        fp8 = dataclasses.replace(fp8, model_config=dataclasses.replace(fp8.model_config, quantization="fp8"))
        assert select_kernels(fp8).pdl_policy == PdlPolicy(enabled=True, preload="row", steps="one")
        awq = _model_config(4096, quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128,
                                                        "zero_point": True, "version": "gemm"})
        assert select_kernels(awq).pdl_policy == PdlPolicy(enabled=True, preload="row", steps="one")
        blocks = _model_config(4096, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
        assert not select_kernels(blocks).pdl and select_kernels(_model_config(1024)).pdl
        unknown = _model_config(4096, quantization_config={"quant_method": "bitsandbytes"})
        assert not select_kernels(unknown).pdl  # the loader reports the format; the selection stays plain
        tp2 = _model_config(4096)
        two_ranks = dataclasses.replace(tp2.parallel_config, tensor_parallel_size=2)
        tp2 = dataclasses.replace(tp2, parallel_config=two_ranks)
        assert not select_kernels(tp2).pdl  # not measured over several GPUs
        assert not select_kernels(_model_config(None)).pdl
        assert select_kernels(_model_config(2048, num_experts=128)).pdl
        assert select_kernels(_model_config(2048, num_local_experts=8)).pdl
        assert not select_kernels(_model_config(4096, num_local_experts=8)).pdl
        # the norm fold stays dense-only; the short-context graphs take MoE models too (measured 2026-12-03)
        moe = select_kernels(_model_config(2048, num_experts=128))
        assert not moe.norm_fold and moe.decode_context_bounds == (256, 1024)
        assert not select_kernels(_model_config(1024, device="cpu")).pdl
    # 1 and 0 keep their meaning whatever the model; the variants ride along
    monkeypatch.setenv("MESHSERVE_PDL", "1")
    assert select_kernels(_model_config(4096)).pdl_policy == PdlPolicy(enabled=True)
    monkeypatch.setenv("MESHSERVE_PDL_TRIGGER", "late")
    monkeypatch.setenv("MESHSERVE_PDL_ONE_WAVE", "1")
    monkeypatch.setenv("MESHSERVE_PDL_PRELOAD", "row")
    assert select_kernels(_model_config(4096)).pdl_policy == PdlPolicy(True, "late", True, "row")
    monkeypatch.setenv("MESHSERVE_PDL", "0")
    assert select_kernels(_model_config(1024)).pdl_policy == PdlPolicy(False, "late", True, "row")
    # decode-only steps by default; MESHSERVE_PDL_STEPS=all keeps PDL in steps carrying prompt tokens
    assert select_kernels(_model_config(1024)).pdl_policy.steps == "decode"
    monkeypatch.setenv("MESHSERVE_PDL_STEPS", "all")
    assert select_kernels(_model_config(1024)).pdl_policy == PdlPolicy(False, "late", True, "row", "all")
    monkeypatch.setenv("MESHSERVE_PDL_STEPS", "prefill")
    with pytest.raises(ValueError, match="steps"):
        select_kernels(_model_config(1024))
    monkeypatch.delenv("MESHSERVE_PDL_STEPS")
    # the MoE layer's launches: PDL with the down GEMV's preload by default, without it, or plain (0)
    assert select_kernels(_model_config(2048, num_experts=128)).pdl_policy.moe == "preload"
    for value, moe in (("launch", "launch"), ("0", "off"), ("off", "off")):
        monkeypatch.setenv("MESHSERVE_PDL_MOE", value)
        assert select_kernels(_model_config(2048, num_experts=128)).pdl_policy.moe == moe
    monkeypatch.setenv("MESHSERVE_PDL_MOE", "always")
    with pytest.raises(ValueError, match="moe"):
        select_kernels(_model_config(2048, num_experts=128))
    monkeypatch.delenv("MESHSERVE_PDL_MOE")
    monkeypatch.setenv("MESHSERVE_PDL_PRELOAD", "half")
    with pytest.raises(ValueError, match="preload"):
        select_kernels(_model_config(1024))


def test_decode_tile_switch_reaches_the_attention_backend(monkeypatch):
    # auto by default (the grid tile over fp8 caches); legacy keeps the one tile for every batch
    gpu = _config(device="cuda", dtype="bfloat16")
    assert select_kernels(gpu).decode_grid_tile == "auto"
    monkeypatch.setenv("MESHSERVE_DECODE_TILE", "legacy")
    selection = select_kernels(gpu)
    assert selection.decode_grid_tile == "legacy"
    layer = Attention(num_heads=4, head_dim=16, num_kv_heads=2, scale=0.25)
    bind_kernels(torch.nn.Sequential(layer), dataclasses.replace(selection, attention_backend="triton"))
    assert layer.backend.grid_tile == "legacy" and not layer.backend.takes_grid_tile(True)
    monkeypatch.setenv("MESHSERVE_DECODE_TILE", "small")
    with pytest.raises(ValueError, match="MESHSERVE_DECODE_TILE"):
        select_kernels(gpu)


def test_decode_fp8_path_switch_reaches_the_attention_backend(monkeypatch):
    # the words tile by default; "convert" on request, bound to every layer's Triton backend
    gpu = _config(device="cuda", dtype="bfloat16", cache_dtype="fp8")
    assert select_kernels(gpu).decode_fp8_path == "words"
    layer = Attention(num_heads=4, head_dim=16, num_kv_heads=2, scale=0.25)
    bind_kernels(torch.nn.Sequential(layer), dataclasses.replace(select_kernels(gpu), attention_backend="triton"))
    assert layer.backend.fp8_path == "words"
    monkeypatch.setenv("MESHSERVE_DECODE_FP8_PATH", "convert")
    selection = select_kernels(gpu)
    assert selection.decode_fp8_path == "convert"
    bind_kernels(torch.nn.Sequential(layer), dataclasses.replace(selection, attention_backend="triton"))
    assert layer.backend.fp8_path == "convert"
    monkeypatch.setenv("MESHSERVE_DECODE_FP8_PATH", "auto")
    bind_kernels(torch.nn.Sequential(layer), dataclasses.replace(select_kernels(gpu), attention_backend="triton"))
    assert layer.backend.fp8_path == "auto"
    monkeypatch.setenv("MESHSERVE_DECODE_FP8_PATH", "bits")
    with pytest.raises(ValueError, match="MESHSERVE_DECODE_FP8_PATH"):
        select_kernels(gpu)


def test_decode_balanced_switch_reaches_the_attention_backend(monkeypatch):
    # on a Hopper GPU by default at the measured programs an SM (6 over an fp8 cache, 4 over a 16-bit one), on
    # other GPUs and off the GPU off; programs an SM on request, bound to every layer's Triton backend; a bad
    # value is one line
    gpu = _config(device="cuda", dtype="bfloat16", cache_dtype="fp8")
    monkeypatch.setattr(backend_selection, "_hopper", lambda device: False)
    assert select_kernels(gpu).decode_balanced == 0
    monkeypatch.setattr(backend_selection, "_hopper", lambda device: True)
    assert select_kernels(gpu).decode_balanced == 6
    assert select_kernels(_config(device="cuda", dtype="bfloat16")).decode_balanced == 4
    assert select_kernels(_config(device="cpu", dtype="float32")).decode_balanced == 0
    layer = Attention(num_heads=4, head_dim=16, num_kv_heads=2, scale=0.25)
    monkeypatch.setenv("MESHSERVE_DECODE_BALANCED", "6")
    selection = select_kernels(gpu)
    assert selection.decode_balanced == 6
    bind_kernels(torch.nn.Sequential(layer), dataclasses.replace(selection, attention_backend="triton"))
    assert layer.backend.balanced == 6
    monkeypatch.setenv("MESHSERVE_DECODE_BALANCED", "0")
    assert select_kernels(gpu).decode_balanced == 0
    for bad in ("yes", "-1", "33"):
        monkeypatch.setenv("MESHSERVE_DECODE_BALANCED", bad)
        with pytest.raises(InvalidArgumentError, match="MESHSERVE_DECODE_BALANCED takes programs an SM"):
            select_kernels(gpu)


def test_decode_split_switches_reach_the_attention_backend(monkeypatch):
    # the least splits of a short context: 2 by default on the GPU's Triton attention (1 off it: the plain
    # selection), 1 on request (the rule before); the shortest split 256 unless asked; both bound to every layer's
    # Triton backend, which passes them to the split rule; bad values are one line
    gpu = _config(device="cuda", dtype="bfloat16")
    selection = select_kernels(gpu)
    assert (selection.decode_min_splits, selection.decode_split_tokens) == (2, 256)
    assert select_kernels(_config(device="cpu", dtype="float32")).decode_min_splits == 1
    monkeypatch.setenv("MESHSERVE_DECODE_MIN_SPLITS", "1")
    monkeypatch.setenv("MESHSERVE_DECODE_SPLIT_TOKENS", "128")
    selection = select_kernels(gpu)
    assert (selection.decode_min_splits, selection.decode_split_tokens) == (1, 128)
    layer = Attention(num_heads=4, head_dim=16, num_kv_heads=2, scale=0.25)
    bind_kernels(torch.nn.Sequential(layer), dataclasses.replace(selection, attention_backend="triton",
                                                                 decode_min_splits=2))
    assert (layer.backend.min_splits, layer.backend.split_tokens) == (2, 128)
    cpu = torch.device("cpu")
    # one sequence of 4 KV heads at a 256-token bound: one split by the old rule, two by min_splits 2
    assert layer.backend.decode_splits(1, 4, 128, torch.bfloat16, 256, cpu) == 2
    layer.backend.min_splits = 1
    assert layer.backend.decode_splits(1, 4, 128, torch.bfloat16, 256, cpu) == 2  # 128-token splits asked for
    layer.backend.split_tokens = 256
    assert layer.backend.decode_splits(1, 4, 128, torch.bfloat16, 256, cpu) == 1
    for name, bad in (("MESHSERVE_DECODE_MIN_SPLITS", "3"), ("MESHSERVE_DECODE_SPLIT_TOKENS", "100"),
                      ("MESHSERVE_DECODE_SPLIT_TOKENS", "x")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(InvalidArgumentError, match=name):
            select_kernels(gpu)
        monkeypatch.delenv(name)


def test_fp8_gemm_switch(monkeypatch):
    # auto by default (the Triton rowwise GEMM up to FP8_TRITON_MAX_ROWS rows on a GPU, torch._scaled_mm above); either
    # one for every row count on request, read by every fp8 layer from its selection
    gpu = _config(device="cuda", dtype="bfloat16")
    assert select_kernels(gpu).fp8_gemm == "auto"
    monkeypatch.setenv("MESHSERVE_FP8_GEMM", "triton")
    assert select_kernels(gpu).fp8_gemm == "triton"
    monkeypatch.setenv("MESHSERVE_FP8_GEMM", "scaled_mm")
    assert select_kernels(gpu).fp8_gemm == "scaled_mm"
    monkeypatch.setenv("MESHSERVE_FP8_GEMM", "cutlass")
    with pytest.raises(InvalidArgumentError, match="MESHSERVE_FP8_GEMM takes one of scaled_mm, triton, auto"):
        select_kernels(gpu)


def test_greedy_argmax_switch(monkeypatch):
    # on by default with the fused ops (the sampler's Triton pass without noise); off with 0, on the CPU and without
    # the fused ops; the runner hands it to its Sampler
    gpu, cpu = _config(device="cuda", dtype="bfloat16"), _config(device="cpu", dtype="bfloat16")
    monkeypatch.setattr(backend_selection, "fused_ops_importable", lambda: True)
    assert select_kernels(gpu).greedy_argmax and not select_kernels(cpu).greedy_argmax
    monkeypatch.setenv("MESHSERVE_GREEDY_ARGMAX", "0")
    assert not select_kernels(gpu).greedy_argmax
    monkeypatch.setenv("MESHSERVE_GREEDY_ARGMAX", "1")
    assert select_kernels(gpu).greedy_argmax
    monkeypatch.setenv("MESHSERVE_DISABLE_FUSED_OPS", "1")
    assert not select_kernels(gpu).greedy_argmax


def test_decode_gemm_switch(monkeypatch):
    # cuBLAS for 16-bit rows by default; the Triton decode GEMM on request, with the GEMV's conditions (a GPU,
    # the fused ops not disabled)
    gpu, cpu = _config(device="cuda", dtype="bfloat16"), _config(device="cpu", dtype="bfloat16")
    assert not select_kernels(gpu).decode_gemm
    monkeypatch.setenv("MESHSERVE_DECODE_GEMM", "1")
    assert select_kernels(gpu).decode_gemm == select_kernels(gpu).gemv
    assert not select_kernels(cpu).decode_gemm


def test_decode_reduce_switch_reaches_the_attention_backend(monkeypatch):
    # the reduce launch by default; inline (each group's last split reduces) on request, bound to every layer
    from meshserve.layers.attention import Attention

    gpu = _config(device="cuda", dtype="bfloat16")
    assert not select_kernels(gpu).decode_inline_reduce
    monkeypatch.setenv("MESHSERVE_DECODE_REDUCE", "inline")
    selection = select_kernels(gpu)
    assert selection.decode_inline_reduce
    layer = Attention(num_heads=4, head_dim=16, num_kv_heads=2, scale=0.25)
    bind_kernels(torch.nn.Sequential(layer), dataclasses.replace(selection, attention_backend="triton"))
    assert layer.backend.inline_reduce
    monkeypatch.setenv("MESHSERVE_DECODE_REDUCE", "last")
    with pytest.raises(ValueError, match="MESHSERVE_DECODE_REDUCE"):
        select_kernels(gpu)


def test_mla_prefill_reference_switch(monkeypatch):
    # the batched MLA prefill by default on the Triton path; the per-sequence reference for A/B runs
    gpu = _config(device="cuda", dtype="bfloat16")
    assert not select_kernels(gpu).mla_prefill_ref
    monkeypatch.setenv("MESHSERVE_MLA_PREFILL_REF", "1")
    sel = select_kernels(gpu)
    assert sel.mla_prefill_ref and sel.attention_backend == "triton" and sel.cuda_graphs


def test_moe_legacy_switch(monkeypatch):
    # the new MoE path (fused routing, MoE GEMV, tuned configs) by default; the first one on request
    gpu = _config(device="cuda", dtype="bfloat16")
    sel = select_kernels(gpu)
    assert not sel.moe_legacy and sel.fused_ops == fused_ops_importable() and sel.cuda_graphs
    monkeypatch.setenv("MESHSERVE_MOE_LEGACY", "1")
    assert select_kernels(gpu).moe_legacy
    monkeypatch.setenv("MESHSERVE_MOE_LEGACY", "0")
    assert not select_kernels(gpu).moe_legacy
    assert not select_kernels(_config()).moe_legacy  # the CPU path has one MoE: the reference


def test_quantized_gemv_variant_switches(monkeypatch):
    # the batch-1 fp8 / int4 projections: a default each, every variant selectable for the H200 A/B, typos refused
    gpu = _config(device="cuda", dtype="bfloat16")
    sel = select_kernels(gpu)
    assert (sel.fp8_gemv, sel.int4_gemv) == ("words", "half")
    monkeypatch.setenv("MESHSERVE_FP8_GEMV", "scaled_mm")
    monkeypatch.setenv("MESHSERVE_INT4_GEMV", "Matmul")
    sel = select_kernels(gpu)
    assert (sel.fp8_gemv, sel.int4_gemv) == ("scaled_mm", "matmul")
    monkeypatch.setenv("MESHSERVE_INT4_GEMV", "half")
    assert select_kernels(gpu).int4_gemv == "half"
    monkeypatch.setenv("MESHSERVE_INT4_GEMV", "magic_fused")  # measured, lost, removed: refused, not ignored
    with pytest.raises(ValueError, match="MESHSERVE_INT4_GEMV takes one of half, matmul"):
        select_kernels(gpu)
    monkeypatch.setenv("MESHSERVE_INT4_GEMV", "half")
    monkeypatch.setenv("MESHSERVE_FP8_GEMV", "fast")
    with pytest.raises(ValueError, match="MESHSERVE_FP8_GEMV takes one of cvt, half, local, words, scaled_mm"):
        select_kernels(gpu)


@pytest.mark.parametrize("env,field,default,other,choices", [
    ("MESHSERVE_MOE_CONFIGS", "moe_configs", "tuned", "stream", "tuned, stream, legacy"),
    # the decode routing + align: one launch by default (its GPU tests passed on the H200, 2026-12-02)
    ("MESHSERVE_MOE_ROUTE_ALIGN", "moe_route_align", "fused", "chain", "chain, fused"),
])
def test_moe_variant_switches(monkeypatch, env, field, default, other, choices):
    gpu = _config(device="cuda", dtype="bfloat16")
    assert getattr(select_kernels(gpu), field) == default
    monkeypatch.setenv(env, other)
    assert getattr(select_kernels(gpu), field) == other
    monkeypatch.setenv(env, "fast")
    with pytest.raises(ValueError, match=f"{env} takes one of {choices}"):
        select_kernels(gpu)


def test_moe_fuse_shared_switch(monkeypatch):
    """Off by default until measured (issue 24); 1: every batch; N: batches of up to N tokens; on the CPU too
    (the reference path then folds: the tests' check of the wiring)."""
    import sys

    gpu = _config(device="cuda", dtype="bfloat16")
    assert not select_kernels(gpu).moe_fuse_shared and select_kernels(gpu).fuse_shared_tokens == 0
    for raw, tokens in (("1", sys.maxsize), ("256", 256), ("0", 0)):
        monkeypatch.setenv("MESHSERVE_MOE_FUSE_SHARED", raw)
        assert select_kernels(gpu).fuse_shared_tokens == tokens
        assert select_kernels(_config()).fuse_shared_tokens == tokens
    monkeypatch.setenv("MESHSERVE_MOE_FUSE_SHARED", "on")
    with pytest.raises(ValueError, match="MESHSERVE_MOE_FUSE_SHARED takes 0, 1 or a largest token count"):
        select_kernels(gpu)


def test_moe_router_fused_switch(monkeypatch):
    """Off until measured; when asked for, on the CPU too (the reference path takes the same wiring)."""
    gpu = _config(device="cuda", dtype="bfloat16")
    assert not select_kernels(gpu).moe_router_fused
    monkeypatch.setenv("MESHSERVE_MOE_ROUTER_FUSED", "1")
    assert select_kernels(gpu).moe_router_fused and select_kernels(_config()).moe_router_fused
    monkeypatch.setenv("MESHSERVE_MOE_ROUTER_FUSED", "0")
    assert not select_kernels(gpu).moe_router_fused


def test_mla_legacy_and_decode_tile_switches(monkeypatch):
    # the new MLA decode path by default; the legacy one and a decode tile for A/B runs
    gpu = _config(device="cuda", dtype="bfloat16")
    sel = select_kernels(gpu)
    assert not sel.mla_legacy and sel.mla_decode_tile is None and sel.mla_balanced is None  # by batch size
    assert not sel.mla_prefetch and not sel.mla_transposed and sel.mla_decode_kernel == "auto"
    monkeypatch.setenv("MESHSERVE_MLA_DECODE_KERNEL", "Pipelined")
    assert select_kernels(gpu).mla_decode_kernel == "pipelined"
    monkeypatch.setenv("MESHSERVE_MLA_DECODE_KERNEL", "fast")
    with pytest.raises(ValueError, match="MESHSERVE_MLA_DECODE_KERNEL takes one of auto, default, pipelined"):
        select_kernels(gpu)
    monkeypatch.delenv("MESHSERVE_MLA_DECODE_KERNEL")
    monkeypatch.setenv("MESHSERVE_MLA_PREFETCH", "1")
    monkeypatch.setenv("MESHSERVE_MLA_TRANSPOSED", "1")
    assert select_kernels(gpu).mla_prefetch and select_kernels(gpu).mla_transposed
    monkeypatch.setenv("MESHSERVE_MLA_BALANCED", "0")
    assert select_kernels(gpu).mla_balanced is False  # the split kernel at every batch size
    monkeypatch.setenv("MESHSERVE_MLA_LEGACY", "1")
    monkeypatch.setenv("MESHSERVE_MLA_DECODE_TILE", "64, 4,2")
    monkeypatch.setenv("MESHSERVE_MLA_BALANCED", "1")
    sel = select_kernels(gpu)
    assert sel.mla_legacy and sel.mla_decode_tile == (64, 4, 2) and sel.mla_balanced is True
    for bad in ("64,4", "48,4,2", "64,3,2", "x"):
        monkeypatch.setenv("MESHSERVE_MLA_DECODE_TILE", bad)
        with pytest.raises(ValueError, match="MESHSERVE_MLA_DECODE_TILE"):
            select_kernels(gpu)


def test_decode_grid_tile_shape_from_the_environment_reaches_the_backend(monkeypatch):
    from meshserve.kernels.triton_attention import GRID_TILE, decode_tile
    from meshserve.layers.attention import make_attention_backend

    gpu = _config(device="cuda", dtype="bfloat16")
    assert select_kernels(gpu).decode_grid_tile_shape is None
    monkeypatch.setenv("MESHSERVE_DECODE_GRID_TILE", "128,4,5")
    sel = select_kernels(gpu)
    assert sel.decode_grid_tile_shape == (128, 4, 5)
    backend = make_attention_backend("triton", decode_grid_tile_shape=sel.decode_grid_tile_shape)
    assert backend.grid_tile_shape == (128, 4, 5)
    assert make_attention_backend("triton").grid_tile_shape == GRID_TILE
    # the grid launches take it (256 sequences x 8 KV heads on 132 SMs); small grids keep the kernel's default
    assert decode_tile(256, 8, 128, 132, backend.grid_tile_shape) == (128, 4, 5)
    assert decode_tile(8, 8, 128, 132, backend.grid_tile_shape) == (None, 4, None)
    monkeypatch.setenv("MESHSERVE_DECODE_GRID_TILE", "128,4")
    with pytest.raises(ValueError, match="MESHSERVE_DECODE_GRID_TILE"):
        select_kernels(gpu)


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("MESHSERVE_ATTENTION_BACKEND", "torch")
    monkeypatch.setenv("MESHSERVE_DISABLE_FUSED_OPS", "1")
    sel = select_kernels(_config(device="cuda"))
    assert sel == KernelSelection(kv_cache_dtype=torch.float32)
    monkeypatch.setenv("MESHSERVE_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_kernels(_config())


def test_decode_fused_prologue_switch_reaches_every_attention_layer(monkeypatch):
    # "split" by default (issue 29: measured on the H200); with the fused prologue only (a GPU, Triton)
    gpu = _config(device="cuda", dtype="bfloat16")
    monkeypatch.delenv("MESHSERVE_DECODE_FUSED_PROLOGUE", raising=False)
    default = select_kernels(gpu)
    assert default.decode_fused_prologue == fused_ops_importable() and default.decode_fused_min_splits == 2
    monkeypatch.setenv("MESHSERVE_DECODE_FUSED_PROLOGUE", "1")
    on = select_kernels(gpu)
    assert on.decode_fused_prologue == on.fused_prologue == fused_ops_importable()
    assert on.decode_fused_min_splits == 1
    monkeypatch.setenv("MESHSERVE_DECODE_FUSED_PROLOGUE", "split")  # only launches with KV splits
    split = select_kernels(gpu)
    assert split.decode_fused_prologue == fused_ops_importable() and split.decode_fused_min_splits == 2
    monkeypatch.setenv("MESHSERVE_DECODE_FUSED_PROLOGUE", "1")
    assert not select_kernels(_config(dtype="bfloat16")).decode_fused_prologue  # CPU: the torch path
    monkeypatch.setenv("MESHSERVE_ATTENTION_BACKEND", "torch")
    assert not select_kernels(gpu).decode_fused_prologue
    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND")
    monkeypatch.setenv("MESHSERVE_DISABLE_FUSED_OPS", "1")
    assert not select_kernels(gpu).decode_fused_prologue
    monkeypatch.delenv("MESHSERVE_DISABLE_FUSED_OPS")
    monkeypatch.setenv("MESHSERVE_DECODE_FUSED_PROLOGUE", "0")
    off = select_kernels(gpu)
    assert not off.decode_fused_prologue
    layers = [Attention(num_heads=4, head_dim=16, num_kv_heads=2, scale=0.25) for _ in range(2)]
    for selection in (KernelSelection(fused_prologue=True, decode_fused_prologue=True, decode_fused_min_splits=1),
                      off):
        bind_kernels(torch.nn.Sequential(*layers), selection)
        assert all(a.decode_fused_prologue == selection.decode_fused_prologue for a in layers)
        assert all(a.decode_fused_min_splits == selection.decode_fused_min_splits for a in layers)


def test_cache_dtype():
    assert select_kernels(_config(cache_dtype="bfloat16")).kv_cache_dtype == torch.bfloat16
    with pytest.raises(InvalidArgumentError):
        select_kernels(_config(cache_dtype="int3"))
    # an fp8 cache serves every backend; the fused prologue scales it as the Triton cache write does
    assert select_kernels(_config(cache_dtype="fp8")).kv_cache_dtype == torch.float8_e4m3fn
    fp8_gpu = select_kernels(_config(device="cuda", dtype="bfloat16", cache_dtype="fp8_e4m3"))
    assert fp8_gpu.kv_cache_dtype == torch.float8_e4m3fn and fp8_gpu.attention_backend == "triton"
    assert fp8_gpu.fused_prologue == fused_ops_importable()
    with pytest.raises(InvalidArgumentError, match="model dtype"):  # the Triton kernels read model-dtype caches
        select_kernels(_config(device="cuda", dtype="bfloat16", cache_dtype="float16"))


def test_bind_hands_the_selection_to_every_layer():
    hf = AutoConfig.for_model("qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              max_position_embeddings=64)
    model = LlamaForCausalLM(hf)
    users = [m for m in model.modules() if hasattr(m, "kernels")]
    assert users and all(m.kernels is PLAIN for m in users)
    sel = KernelSelection(fused_prologue=True, kv_cache_dtype=torch.float32)
    bind_kernels(model, sel)
    assert all(m.kernels is sel for m in users)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attns) == 2 and all(a.fused_prologue for a in attns)
    assert isinstance(attns[0].backend, TorchAttentionBackend) and attns[0].backend is attns[1].backend
    assert not attns[0].can_fuse_prologue  # no cache bound yet


def test_a_bad_fp8_v_layout_fails_at_selection(monkeypatch):
    # the switch is read at every cache write and attention launch (kernels/kv_layout.py); a typo must stop the
    # start, one line naming it, not the first step
    monkeypatch.setenv("MESHSERVE_FP8_V_LAYOUT", "sideways")
    with pytest.raises(ValueError, match="MESHSERVE_FP8_V_LAYOUT='sideways': expected one of rows, transposed"):
        select_kernels(_model_config(1024))
    monkeypatch.setenv("MESHSERVE_FP8_V_LAYOUT", "rows")
    select_kernels(_model_config(1024))


def test_decode_layer_switch_parses_its_mode_and_tile(monkeypatch):
    monkeypatch.delenv("MESHSERVE_DECODE_LAYER", raising=False)
    assert backend_selection._decode_layer() is None
    for raw, expect in (("0", None), ("1", (True, 1, 8, 32)), ("phases", (False, 1, 8, 32)),
                        ("1:2,4", (True, 2, 4, 32)), ("1:1,8,64", (True, 1, 8, 64))):
        monkeypatch.setenv("MESHSERVE_DECODE_LAYER", raw)
        assert backend_selection._decode_layer() == expect, raw
    for bad in ("on", "1:2", "1:0,8", "1:1,6", "phases:a,b", "1:1,8,48", "1:1,8,32,1"):
        monkeypatch.setenv("MESHSERVE_DECODE_LAYER", bad)
        with pytest.raises(InvalidArgumentError, match="MESHSERVE_DECODE_LAYER"):
            backend_selection._decode_layer()
