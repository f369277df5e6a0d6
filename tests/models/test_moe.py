"""Mixtral, Qwen3-MoE and Qwen2-MoE (shared expert) against HF transformers: the router math, the experts, logits and weight loading."""

from __future__ import annotations

import random

import pytest
import torch

from meshserve import LLM, SamplingParams
from meshserve.distributed import parallel_state
from meshserve.kernels.moe_ref import fused_experts_ref
from meshserve.layers.moe_routing import SoftmaxTopK
from tests.conftest import VOCAB


def _hf_config(model_type: str, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, **kw)


@pytest.mark.parametrize("model_type,norm", [("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False)])
def test_routing_matches_hf_router(model_type, norm):
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    if model_type == "mixtral":
        cfg = _hf_config("mixtral", num_local_experts=8, num_experts_per_tok=2)
        router = MixtralTopKRouter(cfg)
    else:
        cfg = _hf_config("qwen3_moe", num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm)
        router = Qwen3MoeTopKRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(11, 32)
    _, hf_weights, hf_ids = router(x)
    weights, ids = SoftmaxTopK(cfg.num_experts_per_tok, renormalize=norm)(x @ router.weight.t())
    assert torch.equal(ids.long(), hf_ids)
    torch.testing.assert_close(weights, hf_weights.float())
    assert torch.allclose(weights.sum(-1), torch.ones(11)) == norm


def test_reference_experts_match_hf_experts():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = _hf_config("qwen3_moe", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24)
    experts = Qwen3MoeExperts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(9, 32)
    weights, ids = SoftmaxTopK(3, renormalize=True)(torch.randn(9, 8))
    with torch.no_grad():
        expected = experts(x, ids.long(), weights)
        got = fused_experts_ref(x, experts.gate_up_proj, experts.down_proj, weights, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_prompt_logprobs_match_hf(family, tiny_model_dir, hf_model):
    path = tiny_model_dir(family)
    rng = random.Random(7)
    prompt = [rng.randrange(3, VOCAB) for _ in range(30)]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(path)(torch.tensor([prompt])).logits[0].float(), -1)
    llm = LLM(model=path, max_num_batched_tokens=7)  # chunked prefill: the experts see many batch shapes
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=3),
                       use_tqdm=False)[0]
    for pos in range(1, len(prompt)):
        for tid, lp in out.prompt_logprobs[pos].items():
            assert lp.logprob == pytest.approx(ref[pos - 1, tid].item(), abs=1e-4)


@pytest.fixture
def fake_rank(monkeypatch):
    """Build layers as rank `tp_rank` of a TP group (no process group: building and loading never talk)."""

    def set_rank(tp_rank: int, tp_size: int, expert_parallel: bool) -> None:
        monkeypatch.setattr(parallel_state, "_STATE", parallel_state.ParallelState(
            tp_rank=tp_rank, tp_size=tp_size, rank=tp_rank, world_size=tp_size, expert_parallel=expert_parallel))

    return set_rank


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
def test_each_rank_loads_its_experts_from_either_checkpoint_form(expert_parallel, fake_rank, tiny_model_dir):
    """Per-expert tensors (the files) and transformers 5's stacked tensors (what dummy weights are drawn as)
    load the same numbers; rank 1 of 2 holds the upper half of each expert's width (TP) or the upper half of
    the experts whole (EP)."""
    from transformers import AutoModelForCausalLM

    from meshserve.models.loader import ModelSource, load_tensors, build_model

    path = tiny_model_dir("qwen3_moe")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stacked = hf.model.layers[0].mlp.experts  # [experts, 2 * width, hidden] and [experts, hidden, width]
    fake_rank(1, 2, expert_parallel)
    model = build_model(ModelSource("x", hf.config, path, None), torch.float32, torch.device("cpu"), 64)
    moe = model.model.layers[0].mlp.experts
    experts, width = stacked.down_proj.shape[0], stacked.down_proj.shape[2]
    if expert_parallel:
        gate_up, down = stacked.gate_up_proj[experts // 2:], stacked.down_proj[experts // 2:]
    else:
        half = slice(width // 2, width)
        gate_up = torch.cat([stacked.gate_up_proj[:, half], stacked.gate_up_proj[:, width + width // 2:]], dim=1)
        down = stacked.down_proj[:, :, half]
    assert torch.equal(moe.w13_weight, gate_up) and torch.equal(moe.w2_weight, down)
    moe.w13_weight.data.zero_()
    moe.w2_weight.data.zero_()
    tensors = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors  # the stacked form
    load_tensors(model, tensors.items(), "stacked")
    assert torch.equal(moe.w13_weight, gate_up) and torch.equal(moe.w2_weight, down)


def test_uneven_experts_are_a_one_line_error(tmp_path):
    import json

    from meshserve.config import EngineArgs
    from meshserve.engine.args_check import check_engine_args
    from meshserve.errors import InvalidArgumentError

    fields = {**_hf_config("mixtral", num_local_experts=6, num_experts_per_tok=2).to_dict()}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(InvalidArgumentError, match=r"^enable_expert_parallel: 6 experts do not divide evenly "
                                                   r"over tensor_parallel_size 4$"):
        check_engine_args(EngineArgs(model=str(path), load_format="dummy", tensor_parallel_size=4,
                                     enable_expert_parallel=True))
    check_engine_args(EngineArgs(model=str(path), load_format="dummy", tensor_parallel_size=2,
                                 enable_expert_parallel=True))


def test_fused_router_switch_keeps_greedy_tokens(tiny_model_dir, monkeypatch):
    """MESHSERVE_MOE_ROUTER_FUSED=1 routes each one-token step through SparseMoeBlock -> forward_with_router (on
    the CPU its reference path: the router's linear, then the routing); tokens equal to the switch off."""
    path = tiny_model_dir("qwen3_moe")
    prompts = [{"prompt_token_ids": [5, 9, 11, 4, 20]}, {"prompt_token_ids": [7, 3]}]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    from meshserve.layers.fused_moe import FusedMoE

    calls = []
    inner = FusedMoE.forward_with_router

    def counted(self, hidden, router):
        calls.append(hidden.shape[0])
        return inner(self, hidden, router)

    monkeypatch.setattr(FusedMoE, "forward_with_router", counted)
    outs = []
    for raw in ("0", "1"):
        monkeypatch.setenv("MESHSERVE_MOE_ROUTER_FUSED", raw)
        llm = LLM(model=path, max_num_seqs=1)  # one sequence a step: every decode step is one token
        assert llm.engine.runner.kernels.moe_router_fused == (raw == "1")
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        assert bool(calls) == (raw == "1") and set(calls) <= {1}
    assert outs[0] == outs[1] and all(len(t) == 6 for t in outs[0])
