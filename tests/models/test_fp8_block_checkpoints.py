"""Block-wise FP8 checkpoints end to end (DeepSeek-V3 / Qwen3 FP8 layout): tiny random bf16 checkpoints quantized
block-wise by the project's quantizer (fp8 weights, weight_scale_inv per 128 x 128 block, HF's "fp8"
quantization_config with weight_block_size), loaded by the engine, and compared with the checkpoint dequantized
here independently (numpy, from the format's description):
- against the dequantized model as is (HF transformers, no activation rounding): prompt logprobs within ~3%. Greedy
  tokens are not compared there: on a random tiny model the top-2 logprob margins go down to ~0.04 while fp8
  activations move logprobs by up to ~0.5, so near-ties flip;
- against HF transformers running the dequantized model with the format's run-time activation rounding written
  out here (per token and per 128 features to e4m3, on the inputs of the layers that hold fp8 weights): greedy
  tokens equal, prompt logprobs equal to fp32 summation noise.

Shapes are chosen so every merged shard holds whole 128-row blocks (q 512, k/v 256, gate/up 512) while the
hidden size 320 leaves partial blocks on K and on the output rows of o_proj / down_proj.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from meshserve import LLM, SamplingParams
from meshserve.errors import ModelLoadError
from tests.quant_fixtures import (
    BLOCK,
    DEEPSEEK_V3_BLOCK_FP8,
    block_fp8_checkpoints,
    dequantize_block_fp8,
    fake_quant_fp8,
)

DENSE = {
    "hidden_size": 320,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
}
FAMILIES = {
    "llama": {"model_type": "llama", "tie_word_embeddings": False, **DENSE},
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True, **DENSE},
    # every layer dense (no routed experts); MLA projections with several blocks each, kv_b_proj 256 x 160
    "deepseek_v3": {**DEEPSEEK_V3_BLOCK_FP8, "tie_word_embeddings": False, "first_k_dense_replace": 2},
}
PROMPTS = [[(7 * i + 3 * j) % 300 + 5 for i in range(12 + 5 * j)] for j in range(3)]


FP8_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_b_proj")


def _hf_with_fp8_activations(ddir: str):
    """HF's model of the dequantized checkpoint, the inputs of the fp8 layers rounded like the engine's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ddir, dtype=torch.float32).eval()
    model.hooks = [
        mod.register_forward_pre_hook(lambda m, args: (fake_quant_fp8(args[0], BLOCK),))
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in FP8_LAYERS
    ]
    return model


def _hf_run(model, greedy: bool = True) -> tuple[torch.Tensor, list[list[int]]]:
    from tests.engine.test_engine_vs_hf import hf_greedy

    logprobs = []
    with torch.no_grad():
        for p in PROMPTS:
            lp = torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1)
            logprobs += [lp[i, t].item() for i, t in enumerate(p[1:])]
    return torch.tensor(logprobs), [hf_greedy(model, p, 8) for p in PROMPTS] if greedy else []


def _check_against_dequantized(llm: LLM, ddir: str) -> None:
    quant_lp, quant_tokens = _run(llm)
    hf = _hf_with_fp8_activations(ddir)
    hf_lp, hf_tokens = _hf_run(hf)
    assert quant_tokens == hf_tokens
    # fp32 summation noise can tip an activation across an e4m3 rounding boundary (one element moves by a
    # step, a logprob by a few 0.01): equal but for those
    hf_diff = (quant_lp - hf_lp).abs()
    assert hf_diff.mean() < 5e-3 and hf_diff.max() < 0.1, hf_diff
    for hook in hf.hooks:  # the dequantized model as is
        hook.remove()
    plain_lp, _ = _hf_run(hf, greedy=False)
    plain_diff = (quant_lp - plain_lp).abs().mean()
    assert 0 < plain_diff < 0.03 * plain_lp.abs().mean(), (plain_diff, plain_lp.abs().mean())
    assert hf_diff.mean() < plain_diff / 10  # the activation rounding is the whole difference


def _run(llm: LLM) -> tuple[torch.Tensor, list[list[int]]]:
    """Prompt logprobs of the prompts' tokens, and 8 greedy tokens after each prompt."""
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS],
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=0),
        use_tqdm=False,
    )
    logprobs = [
        pos[tok].logprob for o, p in zip(outs, PROMPTS) for pos, tok in zip(o.prompt_logprobs[1:], p[1:])
    ]
    return torch.tensor(logprobs), [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def block_fp8_dirs(tmp_path_factory):
    """family -> (block-fp8 folder, its independently dequantized fp32 folder, the bf16 source), built once."""
    return block_fp8_checkpoints(tmp_path_factory, FAMILIES, "fp8-block")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_block_fp8_checkpoint_matches_its_dequantized_model(family, block_fp8_dirs):
    qdir, ddir, _ = block_fp8_dirs(family)
    with open(os.path.join(qdir, "config.json")) as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
    tensors = load_file(os.path.join(qdir, "model.safetensors"))
    assert tensors["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"].shape == (3, 4)  # 320 x 512
    llm = LLM(qdir, dtype="float32")
    layer = llm.engine.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    # (512 + 256 + 256) / 128 row blocks, ceil(320 / 128) column blocks
    assert layer.self_attn.qkv_proj.weight_scale_inv.shape == (8, 3)
    assert layer.mlp.gate_up_proj.weight_scale_inv.shape == (8, 3)
    _check_against_dequantized(llm, ddir)


def test_deepseek_block_fp8_dequantizes_kv_b_proj_at_load(block_fp8_dirs):
    """DeepSeek-V3's checkpoints store every MLA projection in fp8; kv_b_proj (read directly by MLA) and the
    replicated q_a_proj / kv_a_proj_with_mqa are dequantized once at load, the rest stays fp8."""
    qdir, ddir, _ = block_fp8_dirs("deepseek_v3")
    tensors = load_file(os.path.join(qdir, "model.safetensors"))
    assert tensors["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    llm = LLM(qdir, dtype="float32")
    attn = llm.engine.runner.model.model.layers[1].self_attn
    want = dequantize_block_fp8(
        tensors["model.layers.1.self_attn.kv_b_proj.weight"],
        tensors["model.layers.1.self_attn.kv_b_proj.weight_scale_inv"],
    )
    assert attn.kv_b_proj.weight.dtype == torch.float32 and torch.equal(attn.kv_b_proj.weight, want)
    assert attn.kv_a_proj_with_mqa.weight.dtype == torch.float32
    assert (
        attn.q_b_proj.weight.dtype == torch.float8_e4m3fn and attn.o_proj.weight.dtype == torch.float8_e4m3fn
    )
    _check_against_dequantized(llm, ddir)


def test_missing_scales_are_one_line_errors(block_fp8_dirs, tmp_path):
    # (block-fp8 MoE experts load: tests/models/test_fp8_moe.py)
    qdir, _, _ = block_fp8_dirs("llama")
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(os.path.join(qdir, "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight_scale_inv"]
    save_file(tensors, str(broken / "model.safetensors"))
    for name in os.listdir(qdir):
        if name.endswith(".json"):
            shutil.copy(os.path.join(qdir, name), broken / name)
    with pytest.raises(
        ModelLoadError, match=r"lacks 1 tensors, e.g. model.layers.1.mlp.down_proj.weight_scale_inv"
    ):
        LLM(str(broken))


@pytest.mark.slow
def test_tensor_parallel_two_ranks_give_one_devices_tokens(block_fp8_dirs):
    """TP = 2 over gloo: q/k/v and gate/up split on 128-row blocks, o_proj/down on 128-feature blocks (so the
    activation groups are one device's)."""
    qdir, _, _ = block_fp8_dirs("llama")
    single_lp, single_tokens = _run(LLM(qdir, dtype="float32"))
    llm = LLM(qdir, dtype="float32", tensor_parallel_size=2)
    try:
        two_lp, two_tokens = _run(llm)
    finally:
        llm.shutdown()
    assert two_tokens == single_tokens
    torch.testing.assert_close(two_lp, single_lp, atol=1e-4, rtol=1e-4)
