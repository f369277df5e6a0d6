"""FP8 MoE experts end to end: tiny Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 (MoE layers) checkpoints written
in block-wise fp8 here (every projection and every routed expert, weight_scale_inv per 128 x 128 block), and
16-bit ones served with online `--quantization fp8` (per-channel experts), each against:
- HF transformers on the dequantized weights as they are (no activation rounding): logprobs within a few %;
- HF transformers on the same weights with the formats' run-time activation rounding written out here (dense
  layers by hooks on their inputs, experts by a forward of their own: each expert's input, and its
  silu(gate) * up, rounded before its projection): greedy tokens equal, logprobs equal up to fp32 summation
  noise (which can tip an activation across an e4m3 rounding boundary: see test_fp8_block_checkpoints.py).
Plus the tensor-parallel / expert-parallel slicing of the experts' block scales and the one-line errors.
"""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from meshserve import LLM
from meshserve.distributed import parallel_state
from meshserve.errors import ModelLoadError
from meshserve.models.quantize_checkpoint import quantize_checkpoint
from tests.models.test_fp8_block_checkpoints import FP8_LAYERS, _hf_run, _run
from tests.quant_fixtures import BLOCK as B
from tests.quant_fixtures import DEEPSEEK_V3_BLOCK_FP8, block_fp8_checkpoints, fake_quant_fp8

ATTN = {"hidden_size": 320, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128}
FAMILIES = {
    # expert widths of whole 128-row blocks (256: two blocks, so TP = 2 splits on a boundary); hidden 320 leaves
    # partial blocks on K and on w2's output rows
    "mixtral": {
        "model_type": "mixtral",
        "intermediate_size": 256,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        **ATTN,
    },
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_experts": 8,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        **ATTN,
    },
    "qwen2_moe": {
        "model_type": "qwen2_moe",
        "intermediate_size": 512,
        "moe_intermediate_size": 256,
        "shared_expert_intermediate_size": 256,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        **ATTN,
    },
    # layer 0 dense, layer 1 MLA + 8 routed experts (sigmoid, grouped top-k) + one shared expert
    "deepseek_v3": {**DEEPSEEK_V3_BLOCK_FP8, "first_k_dense_replace": 1, "n_shared_experts": 1},
}


def _experts_forward(self, hidden, top_k_index, top_k_weights):
    """HF's experts, with the activation rounding of the format (self.fake_quant) before each projection."""
    out = torch.zeros_like(hidden)
    for e in top_k_index.unique().tolist():
        if e >= self.gate_up_proj.shape[0]:
            continue
        token, slot = torch.where(top_k_index == e)
        gate, up = (self.fake_quant(hidden[token]) @ self.gate_up_proj[e].t()).chunk(2, dim=-1)
        y = self.fake_quant(self.act_fn(gate) * up) @ self.down_proj[e].t()
        out.index_add_(0, token, y * top_k_weights[token, slot, None])
    return out


def _hf_oracle(ddir: str, fake_quant, online: bool):
    """HF's model of ddir with the format's rounding: online fp8 also rounds every projection's weights per
    channel (the checkpoint is 16-bit); the block-fp8 checkpoint was dequantized already."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ddir, dtype=torch.float32).eval()
    model.hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in FP8_LAYERS:
            if online:
                mod.weight.data = fake_quant_fp8(mod.weight.data)
            model.hooks.append(mod.register_forward_pre_hook(lambda m, args: (fake_quant(args[0]),)))
        elif hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj"):  # the stacked routed experts
            if online:
                mod.gate_up_proj.data = fake_quant_fp8(mod.gate_up_proj.data)
                mod.down_proj.data = fake_quant_fp8(mod.down_proj.data)
            mod.fake_quant, mod.plain_forward = fake_quant, mod.forward
            mod.forward = types.MethodType(_experts_forward, mod)
    return model


def _check(llm: LLM, ddir: str, fake_quant, online: bool) -> None:
    quant_lp, quant_tokens = _run(llm)
    hf = _hf_oracle(ddir, fake_quant, online)
    hf_lp, hf_tokens = _hf_run(hf)
    assert quant_tokens == hf_tokens
    hf_diff = (quant_lp - hf_lp).abs()
    # most positions equal to fp32 noise; where summation order tipped one activation across an e4m3 rounding
    # boundary (or, through it, a near-tied routing choice), that prompt's later positions move a little (the
    # online Qwen3-MoE case: 60.4% of positions under 1e-4, mean 0.0200, on 2026-12-04's CPU torch)
    assert (hf_diff < 1e-4).float().mean() > 0.55 and hf_diff.mean() < 0.03 and hf_diff.max() < 0.15, hf_diff
    if online:
        return  # (the weights' rounding is part of the oracle: there is no unrounded model to compare with)
    for hook in hf.hooks:  # the dequantized model as is
        hook.remove()
    for mod in hf.modules():
        if hasattr(mod, "plain_forward"):
            mod.forward = mod.plain_forward
    plain_lp, _ = _hf_run(hf, greedy=False)
    plain_diff = (quant_lp - plain_lp).abs().mean()
    # (a little wider than the dense models' 3%: the rounding also moves some routing decisions)
    assert 0 < plain_diff < 0.06 * plain_lp.abs().mean(), (plain_diff, plain_lp.abs().mean())
    assert hf_diff.mean() < plain_diff / 5  # the activation rounding is the whole difference


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    """family -> (block-fp8 folder, its dequantized fp32 folder, the bf16 source), built once."""
    families = {name: {"tie_word_embeddings": False, **fields} for name, fields in FAMILIES.items()}
    return block_fp8_checkpoints(tmp_path_factory, families, "fp8-moe")


def _experts(llm: LLM, layer: int):
    return llm.engine.runner.model.model.layers[layer].mlp.experts


@pytest.mark.parametrize(
    "family,layer,expert_name",
    [
        ("mixtral", 0, "model.layers.0.block_sparse_moe.experts.1.w1"),
        ("qwen3_moe", 0, "model.layers.0.mlp.experts.1.gate_proj"),
        pytest.param("qwen2_moe", 1, "model.layers.1.mlp.experts.1.gate_proj", marks=pytest.mark.slow),
        ("deepseek_v3", 1, "model.layers.1.mlp.experts.1.gate_proj"),
    ],
)
def test_block_fp8_moe_checkpoint_matches_its_dequantized_model(family, layer, expert_name, moe_dirs):
    qdir, ddir, _ = moe_dirs(family)
    tensors = load_file(os.path.join(qdir, "model.safetensors"))
    if family == "mixtral" and expert_name + ".weight" not in tensors:  # transformers' own naming
        expert_name = expert_name.replace("block_sparse_moe", "mlp")
    assert tensors[expert_name + ".weight"].dtype == torch.float8_e4m3fn
    llm = LLM(qdir, dtype="float32")
    experts = _experts(llm, layer)
    width = experts.w2_weight.shape[2]
    hidden = experts.w13_weight.shape[2]
    assert experts.w13_weight.dtype == experts.w2_weight.dtype == torch.float8_e4m3fn
    assert experts.w13_weight_scale_inv.shape == (experts.num_experts, 2 * -(-width // B), -(-hidden // B))
    assert experts.w2_weight_scale_inv.shape == (experts.num_experts, -(-hidden // B), -(-width // B))
    # expert 1's gate rows: the checkpoint's fp8 bytes and scales, as stored
    assert torch.equal(experts.w13_weight[1, :width].float(), tensors[expert_name + ".weight"].float())
    assert torch.equal(
        experts.w13_weight_scale_inv[1, : -(-width // B)], tensors[expert_name + ".weight_scale_inv"]
    )
    _check(llm, ddir, lambda x: fake_quant_fp8(x, B), online=False)


def test_block_fp8_deepseek_keeps_its_shared_mlp_apart_under_the_fold_switch(moe_dirs, monkeypatch):
    """MESHSERVE_MOE_FUSE_SHARED=1 with block-fp8 experts and shared MLP (DeepSeek-V3's checkpoints): the fold
    is refused (the grouped GEMM takes 16-bit shared slices only), the separate MLP runs, and the tokens and
    logprobs are still the dequantized model's."""
    monkeypatch.setenv("MESHSERVE_MOE_FUSE_SHARED", "1")
    qdir, ddir, _ = moe_dirs("deepseek_v3")
    llm = LLM(qdir, dtype="float32")
    assert llm.engine.runner.kernels.moe_fuse_shared
    block = llm.engine.runner.model.model.layers[1].mlp
    assert block.shared_experts.gate_up_proj.quantized
    assert block.experts.foldable_shared_experts == 0 and block._foldable_shared_mlp(4) is None
    _check(llm, ddir, lambda x: fake_quant_fp8(x, B), online=False)


@pytest.mark.parametrize("family", ["mixtral", pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def test_online_fp8_quantizes_experts_per_channel(family, moe_dirs):
    _, _, src = moe_dirs(family)
    llm = LLM(src, dtype="float32", quantization="fp8")
    experts = _experts(llm, 0)
    assert experts.w13_weight.dtype == experts.w2_weight.dtype == torch.float8_e4m3fn
    assert experts.w13_weight_scale.shape == experts.w13_weight.shape[:2]
    assert experts.w2_weight_scale.shape == experts.w2_weight.shape[:2]
    # every output row's largest weight lands on 448 (per-channel scales)
    assert torch.all(experts.w13_weight.float().abs().amax(-1) == 448)
    _check(llm, src, fake_quant_fp8, online=True)


@pytest.fixture
def fake_rank(monkeypatch):
    def set_rank(tp_rank: int, tp_size: int, expert_parallel: bool) -> None:
        monkeypatch.setattr(
            parallel_state,
            "_STATE",
            parallel_state.ParallelState(
                tp_rank=tp_rank,
                tp_size=tp_size,
                rank=tp_rank,
                world_size=tp_size,
                expert_parallel=expert_parallel,
            ),
        )

    return set_rank


def _build(path: str):
    from transformers import AutoConfig

    from meshserve.models.loader import ModelSource, build_model

    cfg = AutoConfig.from_pretrained(path)
    return build_model(ModelSource("x", cfg, path, None), torch.float32, torch.device("cpu"), 64)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
def test_rank_one_of_two_loads_its_experts_scales(expert_parallel, fake_rank, moe_dirs):
    """qwen2_moe's experts are 256 wide (two row blocks) over 8 experts: TP rank 1 holds each expert's second
    block of gate, of up and of down's input features; EP rank 1 holds experts 4..7 whole."""
    qdir, _, _ = moe_dirs("qwen2_moe")
    tensors = load_file(os.path.join(qdir, "model.safetensors"))
    fake_rank(1, 2, expert_parallel)
    experts = _build(qdir).model.layers[0].mlp.experts
    for local in range(experts.num_local_experts):
        e = local + 4 if expert_parallel else local
        part = {
            p: tensors[f"model.layers.0.mlp.experts.{e}.{p}_proj.weight_scale_inv"]
            for p in ("gate", "up", "down")
        }
        weight = {
            p: tensors[f"model.layers.0.mlp.experts.{e}.{p}_proj.weight"].float() for p in ("gate", "up")
        }
        if expert_parallel:
            want13, want2 = torch.cat([part["gate"], part["up"]]), part["down"]
            want_w = torch.cat([weight["gate"], weight["up"]])
        else:
            want13, want2 = torch.cat([part["gate"][1:], part["up"][1:]]), part["down"][:, 1:]
            want_w = torch.cat([weight["gate"][B:], weight["up"][B:]])
        assert torch.equal(experts.w13_weight_scale_inv[local], want13)
        assert torch.equal(experts.w2_weight_scale_inv[local], want2)
        assert torch.equal(experts.w13_weight[local].float(), want_w)
    assert experts.w13_weight_scale_inv.shape == ((4, 4, 3) if expert_parallel else (8, 2, 3))


def test_misaligned_or_unsupported_fp8_experts_are_one_line_errors(fake_rank, moe_dirs, tmp_path):
    # qwen3_moe's experts are 128 wide: TP = 2 would give each rank half a block (EP keeps them whole)
    qdir, _, src = moe_dirs("qwen3_moe")
    fake_rank(0, 2, False)
    with pytest.raises(
        ModelLoadError,
        match=r"fp8 block-wise MoE experts: a width of 64 per rank at tensor "
        r"parallel 2 splits a 128x128 weight block",
    ):
        _build(qdir)
    fake_rank(0, 2, True)
    assert _build(qdir).model.layers[0].mlp.experts.w13_weight_scale_inv.shape == (4, 2, 3)
    fake_rank(0, 1, False)
    # a per-channel fp8 checkpoint of an MoE model: its experts' weight_scale has no path
    ct = quantize_checkpoint(src, str(tmp_path / "ct"), "compressed-tensors")
    with pytest.raises(
        ModelLoadError,
        match=r"compressed-tensors MoE experts \(per-tensor / per-channel fp8 "
        r"checkpoints\) are not supported",
    ):
        _build(ct)
    # a block-fp8 checkpoint that lost one expert's scales
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(os.path.join(qdir, "model.safetensors"))
    del tensors["model.layers.0.mlp.experts.3.down_proj.weight_scale_inv"]
    save_file(tensors, str(broken / "model.safetensors"))
    with open(os.path.join(qdir, "config.json")) as f:
        (broken / "config.json").write_text(json.dumps(json.load(f)))
    with pytest.raises(
        ModelLoadError,
        match=r"the checkpoint lacks the scales of local expert 3 "
        r"\(w2_weight_scale_inv\)",
    ):
        _build(str(broken))


def test_dummy_weights_at_a_block_fp8_config_quantize_experts_block_wise(moe_dirs):
    """--load-format dummy with a block-fp8 config: experts quantized block-wise at load (what benchmarks run)."""
    from transformers import AutoConfig

    from meshserve.models.loader import ModelSource, build_model

    qdir, _, _ = moe_dirs("qwen3_moe")
    cfg = AutoConfig.from_pretrained(qdir)
    model = build_model(ModelSource("x", cfg, None, None), torch.float32, torch.device("cpu"), 64)
    experts = model.model.layers[0].mlp.experts
    assert experts.w13_weight.dtype == torch.float8_e4m3fn and experts.w13_weight_scale_inv.shape == (8, 2, 3)
    # every block of expert 0's gate rows (128 x 128, 128 x 128, 128 x 64) has its own absmax at 448
    for lo in range(0, 320, B):
        assert experts.w13_weight[0, :128, lo : lo + B].float().abs().amax() == 448
