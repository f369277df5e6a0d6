"""DeepSeek-V2 and V3 against HF transformers: the routers, the rotary layout, the MLA latent cache, and greedy
tokens / prompt logprobs of the whole engine under chunked prefill, prefix-cache hits and preemption."""

from __future__ import annotations

import random

import pytest
import torch

from meshserve import LLM, SamplingParams
from meshserve.layers.moe_routing import GroupedTopK
from meshserve.models.deepseek import apply_deepseek_rotary, mla_softmax_scale
from tests.conftest import VOCAB

MAX_NEW = 8


def _hf_config(model_type: str, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=4, **kw)


def test_v3_routing_matches_hf_router():
    """Sigmoid scores, a correction bias that changes the choice but not the weights, top-2-sum group scores,
    group-limited top-k, renormalized and scaled."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = _hf_config("deepseek_v3", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                     norm_topk_prob=True, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.normal_(0.0, 0.3)
    x = torch.randn(64, 32)
    _, hf_weights, hf_ids = router(x)
    routing = GroupedTopK(4, 4, 2, "sigmoid", "top2_sum", True, 2.5, router.e_score_correction_bias)
    weights, ids = routing(x @ router.weight.t())
    order, hf_order = ids.long().sort(-1), hf_ids.sort(-1)
    assert torch.equal(order.values, hf_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), hf_weights.gather(1, hf_order.indices))
    # the bias matters here: without it other experts win for some tokens
    plain = GroupedTopK(4, 4, 2, "sigmoid", "top2_sum", True, 2.5)(x @ router.weight.t())[1]
    assert not torch.equal(plain.long().sort(-1).values, hf_order.values)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_v2_routing_matches_hf_router(method):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = _hf_config("deepseek_v2", n_routed_experts=16, n_group=4, topk_group=1, num_experts_per_tok=3,
                     topk_method=method, routed_scaling_factor=1.5)
    router = DeepseekV2TopkRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, 32)
    _, hf_weights, hf_ids = router(x)
    groups = 4 if method == "group_limited_greedy" else 1
    weights, ids = GroupedTopK(3, groups, 1, "softmax", "max", False, 1.5)(x @ router.weight.t())
    order, hf_order = ids.long().sort(-1), hf_ids.sort(-1)
    assert torch.equal(order.values, hf_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), hf_weights.gather(1, hf_order.indices))
    if method == "group_limited_greedy":  # topk_group 1: all three experts from one group of four
        assert bool((ids // 4 == ids[:, :1] // 4).all())


def test_rotary_layouts_match_hf():
    """V3's interleaved rotary equals HF's; V2's complex form is the same up to one permutation of the rotary
    dims applied to q and k alike, so q . k is unchanged; rotate-half (rope_interleave false) equals HF's."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        apply_rotary_pos_emb,
        apply_rotary_pos_emb_interleave,
    )

    t, h, p = 5, 3, 8
    q, k = torch.randn(t, h, p), torch.randn(t, 1, p)
    freqs = torch.outer(torch.arange(t).float(), torch.rand(p // 2))
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos() * 0.9, emb.sin() * 0.9
    q3, k3 = apply_deepseek_rotary(q, cos, sin, True), apply_deepseek_rotary(k, cos, sin, True)
    hq, hk = apply_rotary_pos_emb_interleave(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(q3, hq[0].transpose(0, 1))
    torch.testing.assert_close(k3, hk[0].transpose(0, 1))
    hq2, hk2 = apply_rotary_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                torch.polar(torch.full_like(freqs, 0.9), freqs)[None])
    torch.testing.assert_close(torch.einsum("thp,tp->th", q3, k3[:, 0]),
                               torch.einsum("htp,tp->th", hq2[0], hk2[0, 0]))
    hq, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(apply_deepseek_rotary(q, cos, sin, False), hq[0].transpose(0, 1))


def test_softmax_scale_has_yarn_mscale():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    cfg = _hf_config("deepseek_v3", qk_nope_head_dim=128, qk_rope_head_dim=64, max_position_embeddings=163840,
                     rope_scaling={"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                   "original_max_position_embeddings": 4096})
    assert mla_softmax_scale(cfg) == pytest.approx(yarn_apply_mscale(cfg.rope_parameters, 192**-0.5))
    assert mla_softmax_scale(cfg) > 192**-0.5 * 1.3  # 0.1 ln 40 + 1 = 1.369, squared


def _prompts() -> list[list[int]]:
    rng = random.Random(11)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 19, 33, 12)]
    # the last two share a 16-token prefix with the second: prefix-cache hits
    return prompts + [prompts[1][:16] + [7, 8, 9], prompts[1][:16] + [10, 11]]


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_greedy_matches_hf_under_chunks_prefix_hits_and_preemption(family, tiny_model_dir, hf_model):
    from tests.engine.test_engine_vs_hf import hf_greedy

    path = tiny_model_dir(family)
    prompts = _prompts()
    # chunked prefill (budget 16), 12 blocks of 4 tokens: preemption; shared prefixes: cache hits
    llm = LLM(model=path, max_num_batched_tokens=16, block_size=4, num_gpu_blocks_override=12)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.engine.stats()
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf_model(path), p, MAX_NEW) for p in prompts]
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    # the cache holds one latent + rotary key per token and layer: (32 + 8) x 2 layers x 4 B
    assert llm.engine.executor.collective_rpc("kv_bytes_per_token") == (32 + 8) * 2 * 4


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_greedy_matches_hf_with_the_shared_experts_folded(family, tiny_model_dir, hf_model, monkeypatch):
    """MESHSERVE_MOE_FUSE_SHARED=1: every MoE layer hands its shared MLP (V2: two shared experts, V3: one) to
    the routed experts as more experts of weight one (routed_scaling_factor 1.5 / 2.5 on the routed weights
    only): HF's greedy tokens under chunked prefill, prefix-cache hits and preemption."""
    from meshserve.models.deepseek import DeepseekMoE
    from tests.engine.test_engine_vs_hf import hf_greedy

    monkeypatch.setenv("MESHSERVE_MOE_FUSE_SHARED", "1")
    path = tiny_model_dir(family)
    prompts = _prompts()
    llm = LLM(model=path, max_num_batched_tokens=16, block_size=4, num_gpu_blocks_override=12)
    blocks = [m for m in llm.engine.runner.model.modules() if isinstance(m, DeepseekMoE)]
    folded = []
    for block in blocks:
        block.experts.register_forward_pre_hook(lambda m, args, kw: folded.append("shared_mlp" in kw),
                                                with_kwargs=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf_model(path), p, MAX_NEW) for p in prompts]
    assert blocks and folded and all(folded)
    assert llm.engine.stats()["num_preemptions"] > 0


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_prompt_logprobs_match_hf(family, tiny_model_dir, hf_model):
    path = tiny_model_dir(family)
    prompt = [random.Random(7).randrange(3, VOCAB) for _ in range(30)]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(path)(torch.tensor([prompt])).logits[0].float(), -1)
    llm = LLM(model=path, max_num_batched_tokens=7)  # chunks that attend over cached latents
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=3),
                       use_tqdm=False)[0]
    for pos in range(1, len(prompt)):
        for tid, lp in out.prompt_logprobs[pos].items():
            assert lp.logprob == pytest.approx(ref[pos - 1, tid].item(), abs=1e-4)


def test_unsupported_fp8_checkpoints_are_a_one_line_error(tiny_model_dir, tmp_path):
    """DeepSeek-V3's block-wise FP8 (128 x 128) loads for MLA and dense layers (tests/models/
    test_fp8_block_checkpoints.py); other block sizes fail in one clear line before anything starts (argument
    check), and shapes that would cut a block at load; dummy weights at the same config still run."""
    import json
    import shutil

    from meshserve.config import EngineArgs
    from meshserve.engine.args_check import check_engine_args
    from meshserve.errors import ModelLoadError

    folder = tmp_path / "fp8"
    shutil.copytree(tiny_model_dir("deepseek_v3"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(cfg))
    check_engine_args(EngineArgs(model=str(folder)))
    # the tiny model's gate/up (192 rows each) cannot hold whole 128-row blocks (its layer 1's experts could not
    # load either)
    with pytest.raises(ModelLoadError, match=r"shard of 192 output features in one merged projection does not"):
        LLM(model=str(folder))
    check_engine_args(EngineArgs(model=str(folder), load_format="dummy"))
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"fp8: fp8 \(64x64 block scales\) quantized checkpoints are not supported"):
        check_engine_args(EngineArgs(model=str(folder)))


@pytest.mark.slow  # the layer-level interpreter test (tests/layers/test_mla_attention.py) is the fast one
@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter on CPU (on a GPU: -m gpu tests)")
def test_engine_with_triton_mla_kernels_matches_hf(tiny_model_dir, hf_model, monkeypatch):
    """The whole engine on the Triton latent write + absorbed decode kernels (Triton's CPU interpreter), mixed
    steps and preemption included: HF's tokens."""
    pytest.importorskip("triton")
    from meshserve.layers.mla_attention import MLAAttention
    from tests.engine.test_engine_vs_hf import hf_greedy

    calls = []
    monkeypatch.setattr(MLAAttention, "_use_triton", lambda self, x: calls.append(1) or True)
    path = tiny_model_dir("deepseek_v3")
    llm = LLM(model=path, max_num_batched_tokens=16, block_size=4, num_gpu_blocks_override=12)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf_model(path), p, MAX_NEW) for p in _prompts()]
    assert calls and llm.engine.stats()["num_preemptions"] > 0


def test_swap_preemption_moves_latent_blocks(tiny_model_dir, hf_model):
    """Swap preemption through the CPU offload tier: MLA blocks ([1, block_size, 1, latent + rotary key] per
    layer) go out and come back intact (crc-verified), tokens HF's."""
    from tests.engine.test_engine_vs_hf import hf_greedy

    path = tiny_model_dir("deepseek_v3")
    prompts = _prompts()
    llm = LLM(model=path, block_size=4, num_gpu_blocks_override=12, kv_offloading_size=64 / 1024,
              preemption_mode="swap", kv_offloading_verify=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.engine.stats()
    assert llm.engine.executor.collective_rpc("kv_block_layout")[0] == (2, 1, 4, 1, 40)
    llm.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf_model(path), p, MAX_NEW) for p in prompts]
    assert stats["num_preemptions"] > 0 and stats["kv_offload_swaps_in"] == stats["num_preemptions"]


def test_fp8_weights_run_and_fp8_latent_cache_is_refused(tiny_model_dir):
    """Online FP8 quantizes the projections but not kv_b_proj (MLA absorbs its weight into the query and the
    output); an FP8 latent cache is a one-line error, not a crash in the cache write."""
    from meshserve.errors import InvalidArgumentError
    from meshserve.sampling import SamplingParams

    path = tiny_model_dir("deepseek_v3")
    llm = LLM(model=path, quantization="fp8")
    attn = llm.engine.runner.model.model.layers[0].self_attn
    assert attn.kv_b_proj.weight.dtype == torch.float32
    assert attn.o_proj.weight.dtype == torch.float8_e4m3fn
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(temperature=0, max_tokens=4),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    llm.shutdown()
    with pytest.raises(InvalidArgumentError, match="kv_cache_dtype fp8 is not supported for MLA"):
        LLM(model=path, kv_cache_dtype="fp8")


def _moe_block(family: str, shared: int):
    """A tiny DeepSeek MoE block (16 experts of 16, top-3, `shared` shared experts, routed_scaling_factor 1.5:
    applied to the routed weights only), random fp32 weights, kernels PLAIN."""
    from meshserve.models.deepseek import DeepseekMoE, _RoutingFactory

    v3 = family == "deepseek_v3"
    cfg = _hf_config(family, n_routed_experts=16, n_group=4 if v3 else 1, topk_group=2 if v3 else 1,
                     num_experts_per_tok=3, topk_method="noaux_tc" if v3 else "greedy", norm_topk_prob=v3,
                     routed_scaling_factor=1.5, n_shared_experts=shared, moe_intermediate_size=16)
    torch.manual_seed(0)
    block = DeepseekMoE(cfg, _RoutingFactory(cfg, 3 if v3 else 2))
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    return block


def _bind(block, kernels) -> None:
    block.apply(lambda m: setattr(m, "kernels", kernels) if hasattr(m, "kernels") else None)


@pytest.mark.parametrize("fuse_shared", [False, True], ids=["gemv-only", "fuse-shared"])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_shared_experts_fold_into_the_routed_experts(tokens, fuse_shared):
    """On the Triton path (here its reference) small batches, and every batch with moe_fuse_shared, pass the
    shared MLP's weights to the routed experts (two shared experts = two more slices of weight one) instead
    of running it beside them: the same output as the separate MLP; the plain path keeps the separate MLP."""
    from meshserve.layers.backend_selection import PLAIN, KernelSelection

    block = _moe_block("deepseek_v2", shared=2)
    x = torch.randn(tokens, 32)
    _bind(block, PLAIN)
    plain = block(x)
    assert block._foldable_shared_mlp(tokens) is None  # the plain path keeps the model's structure
    _bind(block, KernelSelection(fused_ops=True, moe_fuse_shared=fuse_shared))
    folds = tokens == 1 or fuse_shared  # gemv_serves: one token
    assert (block._foldable_shared_mlp(tokens) is not None) == folds
    calls = []
    block.shared_experts.register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(block(x), plain, atol=1e-5, rtol=1e-5)
    assert bool(calls) != folds  # the separate MLP ran exactly when nothing folded
    _bind(block, KernelSelection(fused_ops=True, moe_fuse_shared=fuse_shared, moe_legacy=True))
    assert block._foldable_shared_mlp(tokens) is None  # the legacy path keeps the separate MLP
    _bind(block, KernelSelection(fused_ops=True, moe_fuse_shared=fuse_shared, moe_fuse_shared_max_tokens=3))
    assert (block._foldable_shared_mlp(tokens) is not None) == (tokens == 1 or fuse_shared and tokens <= 3)


def test_expert_parallel_keeps_the_shared_mlp_apart(monkeypatch):
    """Expert parallel: a rank holds only its experts and a slice of the batch, so the shared MLP stays a
    separate MLP even with moe_fuse_shared; the warm-up counts are the routed experts' alone."""
    from meshserve.distributed import parallel_state
    from meshserve.kernels.moe import warmup_token_counts
    from meshserve.layers.backend_selection import KernelSelection

    monkeypatch.setattr(parallel_state, "_STATE", parallel_state.ParallelState(
        tp_rank=0, tp_size=2, rank=0, world_size=2, expert_parallel=True))
    block = _moe_block("deepseek_v2", shared=2)
    _bind(block, KernelSelection(fused_ops=True, moe_fuse_shared=True))
    assert block.experts.expert_parallel and block.experts.num_local_experts == 8
    assert block._foldable_shared_mlp(1) is None and block._foldable_shared_mlp(40) is None
    assert block.experts.warmup_token_counts(512, 2) == warmup_token_counts(512, 3, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter on CPU (on a GPU: -m gpu tests)")
@pytest.mark.parametrize("family,shared", [("deepseek_v2", 2), ("deepseek_v3", 1)], ids=["v2", "v3"])
def test_folded_block_runs_the_triton_kernels_like_the_separate_mlp(family, shared, monkeypatch):
    """The block with moe_fuse_shared through the Triton MoE kernels themselves (the interpreter: triton_moe's
    pair GEMV at 1 token, the grouped GEMMs at 9 and 40) equals the plain block, the shared MLP beside the experts, in
    fp32 up to summation order."""
    pytest.importorskip("triton")
    from meshserve.kernels import triton_moe
    from meshserve.layers import fused_moe
    from meshserve.layers.backend_selection import PLAIN, KernelSelection

    seen = []

    def on_kernels(*args, triton, legacy, table, **kw):  # the dispatcher takes Triton for CUDA tensors only
        seen.append(kw["shared_w13"].shape[0] // (2 * args[2].shape[2]))
        return triton_moe.fused_experts(*args, configs=table, **kw)

    block = _moe_block(family, shared)
    xs = [torch.randn(tokens, 32) for tokens in (1, 9, 40)]
    _bind(block, PLAIN)
    plains = [block(x) for x in xs]
    monkeypatch.setattr(fused_moe, "fused_experts", on_kernels)
    _bind(block, KernelSelection(fused_ops=True, moe_fuse_shared=True))
    for x, plain in zip(xs, plains):
        torch.testing.assert_close(block(x), plain, atol=1e-5, rtol=1e-5)
    assert seen == [shared] * 3


@pytest.mark.gpu
@pytest.mark.parametrize("fuse_shared", [False, True], ids=["apart", "fuse-shared"])
@pytest.mark.parametrize("tokens", [1, 2, 8, 64, 256])
def test_moe_block_fast_path_matches_plain_in_a_cuda_graph_gpu(tokens, fuse_shared):
    """DeepSeek-V2-Lite's MoE block (64 experts of 1,408, top-6, two shared experts; hidden cut to 512) in bf16:
    the Triton path (shared MLP folded into the GEMV at 1 token, beside the pair GEMV / grouped GEMM past it,
    or, with moe_fuse_shared, two more experts of theirs), captured in a CUDA graph, gives the plain block's
    output."""
    from transformers import AutoConfig

    from meshserve.layers.backend_selection import PLAIN, KernelSelection
    from meshserve.models.deepseek import DeepseekMoE, _RoutingFactory

    cfg = AutoConfig.for_model("deepseek_v2", hidden_size=512, moe_intermediate_size=1408, n_routed_experts=64,
                               num_experts_per_tok=6, n_shared_experts=2, topk_method="greedy", n_group=1,
                               topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        block = DeepseekMoE(cfg, _RoutingFactory(cfg, 2)).cuda()
    finally:
        torch.set_default_dtype(torch.float32)
    for p in block.parameters():
        p.data.normal_(0, p.shape[-1] ** -0.5)
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)

    def bind(kernels):
        block.apply(lambda m: setattr(m, "kernels", kernels) if hasattr(m, "kernels") else None)

    bind(PLAIN)
    plain = block(x)
    bind(KernelSelection(fused_ops=True, gemv=True, moe_fuse_shared=fuse_shared))
    assert (block._foldable_shared_mlp(tokens) is not None) == (tokens == 1 or fuse_shared)
    block(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block(x)
    graph.replay()
    torch.testing.assert_close(out.float(), plain.float(), atol=3e-2, rtol=3e-2)


def _attention_case(interleave: bool):
    """A tiny DeepseekAttention (random weights, 4 heads) and a step of two decode rows, a 3-token verify row and
    a 10-token prefill chunk over a cache whose context rows are already written."""
    import types

    from meshserve.layers.rotary import RotaryEmbedding
    from meshserve.models.deepseek import DeepseekAttention
    from tests.kernels.test_mla import _meta

    cfg = types.SimpleNamespace(hidden_size=32, num_attention_heads=4, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                v_head_dim=24, kv_lora_rank=32, q_lora_rank=None, attention_bias=False,
                                rope_interleave=interleave, rope_scaling=None, rope_theta=10000.0,
                                max_position_embeddings=64)
    torch.manual_seed(0)
    attn = DeepseekAttention(cfg, RotaryEmbedding(cfg, 8, 64))
    for p in attn.parameters():
        p.data.normal_(0, 0.2)
    q_lens, seq_lens = [1, 1, 3, 10], [9, 30, 17, 12]
    meta = _meta(q_lens, seq_lens, block_size=4, num_blocks=24)
    positions = torch.tensor([p for q, s in zip(q_lens, seq_lens) for p in range(s - q, s)])
    cache = torch.randn(1, 24, 4, 1, 40)
    return attn, meta, positions, torch.randn(len(positions), 32), cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter on CPU (on a GPU: -m gpu tests)")
@pytest.mark.parametrize("interleave", [True, False])
def test_fused_mla_prologue_and_copy_free_absorption_match_the_plain_path(monkeypatch, interleave):
    """DeepseekAttention on the Triton path with the fused prologue (one kernel, split or balanced decode, bmm into [T, H, .]
    buffers), in the interpreter, and with MESHSERVE_MLA_LEGACY's path: the plain torch path's output and
    cache (prefill chunks through the per-sequence reference to keep this fast)."""
    pytest.importorskip("triton")
    from meshserve.kernels import triton_mla_rope
    from meshserve.layers.backend_selection import KernelSelection
    from meshserve.layers.mla_attention import MLAAttention

    attn, meta, positions, hidden, cache = _attention_case(interleave)
    attn.attn.kv_cache = cache.clone()
    expected = attn(positions, hidden, meta).detach()  # grad mode: the copying matmuls
    expected_cache = attn.attn.kv_cache
    monkeypatch.setattr(MLAAttention, "_use_triton", lambda self, x: True)
    fused = []
    real = triton_mla_rope.mla_rope_latent
    monkeypatch.setattr(triton_mla_rope, "mla_rope_latent", lambda *a: fused.append(1) or real(*a))
    for legacy, balanced in ((False, False), (True, False), (False, True)):
        attn.attn.kernels = KernelSelection(attention_backend="triton", fused_prologue=True, mla_prefill_ref=True,
                                            mla_legacy=legacy, mla_balanced=balanced)
        attn.attn.kv_cache = cache.clone()
        with torch.inference_mode():  # as in the runner: the copy-free matmuls
            got = attn(positions, hidden, meta)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(attn.attn.kv_cache, expected_cache, atol=1e-5, rtol=1e-5)
    assert fused == [1, 1]  # the legacy path stays unfused


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 80, 256])
def test_mla_decode_paths_agree_at_v2_lite_shapes_in_a_cuda_graph(batch):
    """DeepSeek-V2-Lite's attention (16 heads, R 512, bf16) on a decode step: the new path replayed from a CUDA
    graph (fused prologue, copy-free absorbed bmm, MLA split rule; and with the balanced decode kernel), the
    legacy path and the torch reference give the same output and the same cache."""
    import random as rnd

    from meshserve.layers.backend_selection import KernelSelection
    from tools.bench_mla_decode import ENGINE_SELECTION, bind, decode_meta, v2_lite_attention

    attn = v2_lite_attention()
    r = rnd.Random(batch)
    lens = [r.randint(100, 2048) for _ in range(batch)]
    meta = decode_meta(lens, 163840)
    blocks = sum(-(-s // 16) for s in lens)
    cache = torch.randn(1, blocks, 16, 1, 576, device="cuda", dtype=torch.bfloat16)
    positions = torch.tensor([s - 1 for s in lens], device="cuda")
    hidden = torch.randn(batch, 2048, device="cuda", dtype=torch.bfloat16)
    outs, caches = {}, {}
    with torch.inference_mode():
        # split / balanced forced, auto (by batch size: split at 1, balanced at 80 and 256), the prefetching and
        # the transposed loops
        paths = {"split": (False, ""), "balanced": (True, ""), "auto": (None, ""), "prefetch": (None, "pf"),
                 "transposed": (None, "tr")}
        for name in ("torch", "legacy", *paths):
            if name == "torch":
                bind(attn, False, KernelSelection())
            elif name == "legacy":
                bind(attn, True, ENGINE_SELECTION)
            else:
                bind(attn, False, ENGINE_SELECTION, *paths[name])
            attn.attn.kv_cache = cache.clone()
            if name in paths:
                attn(positions, hidden, meta)  # compile outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = attn(positions, hidden, meta)
                attn.attn.kv_cache.copy_(cache)
                graph.replay()
                outs[name] = out.float()
            else:
                outs[name] = attn(positions, hidden, meta).float()
            caches[name] = attn.attn.kv_cache.float()
    for name in ("legacy", *paths):
        torch.testing.assert_close(outs[name], outs["torch"], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(caches[name], caches["torch"], atol=2e-2, rtol=2e-2)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter on CPU (on a GPU: -m gpu tests)")
@pytest.mark.parametrize(("balanced", "kernel"), [(False, "default"), (True, "default"), (True, "pipelined")])
def test_engine_with_fused_mla_prologue_matches_hf(tiny_model_dir, hf_model, monkeypatch, balanced, kernel):
    """The whole engine on the fused prologue kernel and the split (or balanced) decode kernel, with the plain
    or the pipelined tile loop (kernels/triton_mla_pipelined.py), in the interpreter, mixed steps and
    preemption included: HF's tokens."""
    pytest.importorskip("triton")
    import dataclasses

    from meshserve.engine import model_runner
    from meshserve.kernels import triton_mla_balanced, triton_mla_rope
    from meshserve.layers.mla_attention import MLAAttention
    from tests.engine.test_engine_vs_hf import hf_greedy

    real = model_runner.select_kernels
    monkeypatch.setattr(model_runner, "select_kernels",
                        lambda config: dataclasses.replace(real(config), fused_prologue=True, mla_balanced=balanced,
                                                           mla_decode_kernel=kernel))
    monkeypatch.setattr(MLAAttention, "_use_triton", lambda self, x: True)
    calls = []
    for module, name in ((triton_mla_rope, "mla_rope_latent"), (triton_mla_balanced, "mla_decode_balanced")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
    path = tiny_model_dir("deepseek_v2")
    llm = LLM(model=path, max_num_batched_tokens=16, block_size=4, num_gpu_blocks_override=12)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf_model(path), p, MAX_NEW) for p in _prompts()]
    assert llm.engine.stats()["num_preemptions"] > 0
    assert "mla_rope_latent" in calls and ("mla_decode_balanced" in calls) == balanced
