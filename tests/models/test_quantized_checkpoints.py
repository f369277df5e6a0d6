"""Quantized checkpoints end to end: tiny random checkpoints rewritten by the project's quantizer in each public
layout, loaded by the engine, and compared with the checkpoint dequantized here independently (numpy, from the
format descriptions). Also: the error lines for broken or unsupported checkpoints, and KV scales."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from meshserve import LLM, SamplingParams
from meshserve.errors import InvalidArgumentError, ModelLoadError
from meshserve.models.loader import build_model, resolve_model_source
from meshserve.models.quantize_checkpoint import quantize_checkpoint
from tests.quant_fixtures import save_plain_copy

GROUP = 32
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[..., C] int32 -> [..., C, 8]: nibble i of each word."""
    words = packed.astype(np.int64) & 0xFFFFFFFF
    return np.stack([(words >> (4 * i)) & 0xF for i in range(8)], axis=-1)


def dequantize_independently(tensors: dict[str, torch.Tensor], base: str, fmt: str) -> torch.Tensor:
    """The float weight [N, K] a checkpoint's tensors describe."""
    if fmt in ("compressed-tensors", "fbgemm_fp8"):
        w = tensors[f"{base}.weight"].float().numpy()
        s = tensors[f"{base}.weight_scale"].float().numpy().reshape(-1, 1)
        return torch.from_numpy(w * s)
    scales = tensors[f"{base}.scales"].float().numpy()  # [K / G, N]
    if fmt == "awq":
        nib = _nibbles(tensors[f"{base}.qweight"].numpy())  # [K, N/8, 8], nibble i = feature 8c + ORDER[i]
        q = np.empty_like(nib)
        q[:, :, AWQ_ORDER] = nib
        q = q.reshape(nib.shape[0], -1)
        zn = _nibbles(tensors[f"{base}.qzeros"].numpy())
        z = np.empty_like(zn)
        z[:, :, AWQ_ORDER] = zn
        z = z.reshape(zn.shape[0], -1)
        groups = np.arange(q.shape[0]) // GROUP
    else:  # gptq v1: rows pack 8 input features, qzeros 8 output features and hold zero - 1
        nib = _nibbles(tensors[f"{base}.qweight"].numpy().T)  # [N, K/8, 8]
        q = nib.reshape(nib.shape[0], -1).T  # [K, N]
        z = _nibbles(tensors[f"{base}.qzeros"].numpy()).reshape(scales.shape[0], -1) + 1
        groups = tensors[f"{base}.g_idx"].numpy()
    w = (q - z[groups]) * scales[groups]  # [K, N]
    return torch.from_numpy(w.T.astype(np.float32))


def _dequantized_copy(src: str, dst: str, fmt: str) -> str:
    """A plain fp32 checkpoint holding the quantized checkpoint's weights, dequantized independently."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    bases = {n.rsplit(".", 1)[0] for n in tensors if n.endswith((".qweight", ".weight_scale"))}
    quant_parts = (
        "weight",
        "qweight",
        "qzeros",
        "scales",
        "g_idx",
        "weight_scale",
        "input_scale",
        "input_scale_ub",
    )
    out = {
        n: t
        for n, t in tensors.items()
        if not (n.rsplit(".", 1)[0] in bases and n.rsplit(".", 1)[1] in quant_parts)
    }
    for base in bases:
        out[f"{base}.weight"] = dequantize_independently(tensors, base, fmt).contiguous()
    return save_plain_copy(src, dst, out)


def _prompt_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    out = llm.generate(
        {"prompt_token_ids": ids},
        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
        use_tqdm=False,
    )[0]
    return torch.tensor([pos[tok].logprob for pos, tok in zip(out.prompt_logprobs[1:], ids[1:])])


PROMPT = [(7 * i + 3) % 300 + 5 for i in range(40)]


@pytest.mark.parametrize(
    "fmt,options",
    [
        ("awq", {}),
        ("gptq", {}),
        ("gptq", {"desc_act": True}),
        ("gptq", {"calibration": "awq-gptq"}),  # AWQ's scaled copy, then GPTQ on its own Hessians
        # AWQ's scales, then GPTQ layer by layer with searched static levels (act-order keeps plain groups)
        pytest.param("gptq", {"calibration": "awq-scale-gptq-mse-seq", "desc_act": True}, marks=pytest.mark.slow),
        # its variants: scales refit to GPTQ's integers; GPTAQ's asymmetric target (a float copy of each layer)
        *(
            pytest.param("gptq", {"calibration": c, "desc_act": True}, marks=pytest.mark.slow)
            for c in ("awq-scale-gptq-mse-seq-refit", "awq-scale-gptaq-mse-seq")
        ),
    ],
)
def test_int4_checkpoint_matches_its_independent_dequantization(fmt, options, tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")  # QKV bias, tied head
    qdir = quantize_checkpoint(src, str(tmp_path / "q"), fmt, group_size=GROUP, **options)
    ddir = _dequantized_copy(qdir, str(tmp_path / "d"), fmt)
    quant = _prompt_logprobs(LLM(qdir), PROMPT)
    plain = _prompt_logprobs(LLM(ddir, tokenizer=src), PROMPT)
    torch.testing.assert_close(quant, plain, atol=2e-4, rtol=1e-4)


def test_gptq_act_order_sorted_at_load_keeps_the_greedy_tokens(tmp_path, monkeypatch):
    """Act-order groups of 64 (the half GEMV's step; the tiny models' 96 features take none, so 128 / 256 here)
    are sorted by group at load (layers/quantization/int4.py): every int4 layer drops g_idx for a perm, and the
    greedy tokens and logprobs are those of the independently dequantized checkpoint and of the same checkpoint
    loaded unsorted (g_idx kept, the path before the sort)."""
    from meshserve.layers.quantization.int4 import Int4LinearMethod
    from tests.conftest import make_tiny_checkpoint

    src = make_tiny_checkpoint(str(tmp_path / "src"), "llama", hidden_size=128, intermediate_size=256)
    qdir = quantize_checkpoint(src, str(tmp_path / "q"), "gptq", group_size=64, desc_act=True)
    model = build_model(resolve_model_source(qdir), torch.float32, torch.device("cpu"), 64)
    int4 = [m for m in model.modules() if isinstance(getattr(m, "quant_method", None), Int4LinearMethod)]
    assert len(int4) == 8 and all(m.g_idx is None and m.perm is not None for m in int4)
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2)

    def run(folder, **kwargs):
        llm = LLM(folder, **kwargs)
        out = llm.generate({"prompt_token_ids": PROMPT[:10]}, params, use_tqdm=False)[0].outputs[0]
        return out.token_ids, torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]), \
            _prompt_logprobs(llm, PROMPT)

    tokens, logprobs, prompt = run(qdir)
    plain_tokens, plain_logprobs, plain_prompt = run(_dequantized_copy(qdir, str(tmp_path / "d"), "gptq"),
                                                     tokenizer=src)
    assert tokens == plain_tokens
    torch.testing.assert_close(logprobs, plain_logprobs, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(prompt, plain_prompt, atol=2e-4, rtol=1e-4)
    kept = []  # the layers the engine built unsorted
    monkeypatch.setattr(Int4LinearMethod, "_sort_act_order",
                        staticmethod(lambda layer, q, g, n: kept.append(layer) or (q, g, None)))
    unsorted_tokens, unsorted_logprobs, unsorted_prompt = run(qdir)
    assert len(kept) == 8 and all(m.g_idx is not None and m.perm is None for m in kept)
    assert unsorted_tokens == tokens
    torch.testing.assert_close(unsorted_logprobs, logprobs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(unsorted_prompt, prompt, atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "fmt,options",
    [
        ("gptq", {"desc_act": True}),  # act-order g_idx, read once per merged projection and compared
        ("awq", {}),
        ("compressed-tensors", {"strategy": "tensor", "input_scale": 0.05}),  # merged shards' scales: their max
        ("fbgemm_fp8", {}),
    ],
)
def test_quantized_checkpoints_load_onto_the_gpu_as_onto_the_cpu(fmt, options, tiny_model_dir, tmp_path):
    """The loader's checks and merges compare checkpoint tensors (on the CPU) with parameters (on the model's
    device): a GPTQ act-order checkpoint failed to load on a GPU (2026-12-05, H200, `cannot load
    model.layers.0.mlp.up_proj.g_idx: Expected all tensors to be on the same device`) where the CPU tests passed."""
    src = tiny_model_dir("llama")
    group = {"group_size": GROUP} if fmt in ("awq", "gptq") else {}
    qdir = quantize_checkpoint(src, str(tmp_path / "q"), fmt, **group, **options)
    cpu = dict(build_model(resolve_model_source(qdir), torch.float32, torch.device("cpu"), 64).named_parameters())
    gpu = dict(build_model(resolve_model_source(qdir), torch.float32, torch.device("cuda"), 64).named_parameters())
    assert cpu.keys() == gpu.keys()
    for name, param in cpu.items():
        assert torch.equal(gpu[name].cpu(), param), name


@pytest.mark.parametrize(
    "fmt,options",
    [
        ("compressed-tensors", {"strategy": "channel"}),
        ("compressed-tensors", {"strategy": "tensor", "input_scale": 0.05, "kv_scale": 0.5}),
        ("compressed-tensors", {"strategy": "channel", "calibration": "gptq-text"}),  # GPTQ-rounded fp8
        # SmoothQuant's folds, sequential GPTQ, static input scales from the calibration text
        ("compressed-tensors", {"strategy": "channel", "calibration": "smooth-gptq-seq-static"}),
        ("fbgemm_fp8", {}),
    ],
)
def test_fp8_checkpoint_loads_its_scales(fmt, options, tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    qdir = quantize_checkpoint(src, str(tmp_path / "q"), fmt, **options)
    model = build_model(resolve_model_source(qdir), torch.float32, torch.device("cpu"), 64)
    tensors = load_file(os.path.join(qdir, "model.safetensors"))
    layer = model.model.layers[1]
    # q, k and v keep their own scales inside the merged projection (per-tensor ones broadcast per row)
    qkv = layer.self_attn.qkv_proj
    got = qkv.weight.float() * qkv.weight_scale[:, None]
    want = torch.cat(
        [
            dequantize_independently(tensors, f"model.layers.1.self_attn.{p}", fmt)
            for p in ("q_proj", "k_proj", "v_proj")
        ]
    )
    assert torch.equal(got, want)
    if "input_scale" in options:
        assert float(qkv.input_scale) == pytest.approx(options["input_scale"])
    elif options.get("calibration", "").endswith("-static"):  # q/k/v read one input: one calibrated scale
        assert float(qkv.input_scale) == float(tensors["model.layers.1.self_attn.q_proj.input_scale"]) > 0
    else:
        assert qkv.input_scale is None
    assert layer.self_attn.attn.k_scale == options.get("kv_scale", 1.0)
    # through the engine: per-channel scales with dynamic activations are exactly what online fp8 makes of
    # the dequantized weights (each row's absmax maps back to 448); a static per-tensor input scale is close
    quant = _prompt_logprobs(LLM(qdir, kv_cache_dtype="fp8" if "kv_scale" in options else "auto"), PROMPT)
    plain_dir = _dequantized_copy(qdir, str(tmp_path / "d"), fmt)
    online = _prompt_logprobs(LLM(plain_dir, tokenizer=src, quantization="fp8"), PROMPT)
    if options.get("strategy", "channel") == "channel" and "calibration" not in options:
        torch.testing.assert_close(quant, online, atol=1e-5, rtol=1e-5)
    else:  # (the tiny random model's large weights amplify fp8 rounding: ~5% of a logprob; GPTQ's error
        # feedback can lower a row's absmax, so online fp8 rescales and rounds that row again)
        assert (quant - online).abs().mean() < 0.1 * online.abs().mean()


def test_online_fp8_and_fp8_kv_cache_run_through_llm(tiny_model_dir):
    src = tiny_model_dir("llama")
    budget = 1 << 20
    base_llm = LLM(src, cpu_kv_cache_bytes=budget)
    base = _prompt_logprobs(base_llm, PROMPT)
    for kwargs in (
        {"quantization": "fp8"},
        {"kv_cache_dtype": "fp8"},
        {"quantization": "fp8", "kv_cache_dtype": "fp8"},
    ):
        llm = LLM(src, cpu_kv_cache_bytes=budget, **kwargs)
        got = _prompt_logprobs(llm, PROMPT)
        # (the tiny random model's large weights amplify fp8 rounding: ~2-5% of a logprob)
        assert not torch.equal(got, base) and (got - base).abs().mean() < 0.1 * base.abs().mean(), kwargs
        # the same bytes hold 4x the blocks of the fp32 cache when the cache is fp8
        ratio = 4 if "kv_cache_dtype" in kwargs else 1
        assert llm.engine.core_client.info.num_blocks // ratio == base_llm.engine.core_client.info.num_blocks


def test_broken_and_unsupported_checkpoints_fail_in_one_line(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    with pytest.raises(
        InvalidArgumentError, match="awq needs a checkpoint whose config.json holds its quantization_config"
    ):
        LLM(src, quantization="awq")
    qdir = quantize_checkpoint(src, str(tmp_path / "q"), "compressed-tensors")
    tensors = load_file(os.path.join(qdir, "model.safetensors"))
    del tensors["model.layers.0.mlp.down_proj.weight_scale"]
    save_file(tensors, os.path.join(qdir, "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"down_proj.weight_scale \(weight format compressed-tensors\)"):
        build_model(resolve_model_source(qdir), torch.float32, torch.device("cpu"), 64)
    # an int4 checkpoint whose packing does not fit the declared group size
    adir = quantize_checkpoint(src, str(tmp_path / "a"), "awq", group_size=GROUP)
    with open(os.path.join(adir, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"]["group_size"] = 16
    with open(os.path.join(adir, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ModelLoadError, match=r"cannot load model.layers.0.\S+.qzeros: shape"):
        build_model(resolve_model_source(adir), torch.float32, torch.device("cpu"), 64)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt,options", [("gptq", {"desc_act": True}), ("compressed-tensors", {"strategy": "tensor"})]
)
def test_tensor_parallel_two_ranks_give_one_devices_logprobs(fmt, options, tiny_model_dir, tmp_path):
    """TP = 2 over gloo on a quantized checkpoint (row-parallel layers split int4 groups / keep act-order ones)."""
    src = tiny_model_dir("llama")
    qdir = quantize_checkpoint(src, str(tmp_path / "q"), fmt, group_size=GROUP, **options)
    single = _prompt_logprobs(LLM(qdir), PROMPT)
    llm = LLM(qdir, tensor_parallel_size=2)
    try:
        two = _prompt_logprobs(llm, PROMPT)
    finally:
        llm.shutdown()
    # fp8's dynamic per-token scales follow each rank's half of a row-parallel input: close, not equal
    tol = 1e-4 if fmt == "gptq" else 0.1 * single.abs().mean().item()
    assert (two - single).abs().mean() < tol


@pytest.mark.parametrize(("fmt", "calibration", "message"), [
    ("awq", "smooth-gptq", "for fp8 \\(compressed-tensors\\) checkpoints, not awq"),
    ("compressed-tensors", "awq-scale-gptq-mse-seq", "for int4 \\(awq, gptq\\) checkpoints, not compressed-tensors"),
    ("gptq", "gtpq", "unknown calibration 'gtpq'"),
])
def test_a_calibration_the_format_cannot_take_is_refused(fmt, calibration, message, tiny_model_dir, tmp_path):
    """Rather than a checkpoint silently written without the calibration asked for."""
    with pytest.raises(ValueError, match=message):
        quantize_checkpoint(tiny_model_dir("llama"), str(tmp_path / "q"), fmt, calibration=calibration)


@pytest.mark.slow  # self-sampling 2 x 511 tokens and sequential GPTQ on the tiny model: ~1-2 min on 2 cores
def test_a_calibrations_windows_damping_and_sink_weight_reach_awq_and_gptq(
    tiny_model_dir, tmp_path, monkeypatch
):
    """A Calibration's samples / awq_more / damp / sink_weight reach the steps they name: AWQ's scale search
    gets the text's windows plus `samples` self-sampled ones (each [BOS] + 511 tokens), GPTQ the damping and
    the attention sink's Hessian weight."""
    import meshserve.models.awq as awq
    import meshserve.models.gptq as gptq
    import meshserve.models.gptq_sequential as sequential
    from meshserve.models.calibration import calibration_text_ids
    from meshserve.models.quantize_checkpoint import CALIBRATIONS, Calibration

    src = tiny_model_dir("qwen2")
    seen: dict = {"damp": set()}
    real_awq, real_gptq, real_seq = awq.awq_transform, gptq.gptq_quantize, sequential.sequential_quantize

    def spy_awq(*args, token_ids=None, **kwargs):
        seen["awq"] = token_ids
        return real_awq(*args, token_ids=token_ids, **kwargs)

    def spy_gptq(*args, damp, **kwargs):
        seen["damp"].add(damp)
        return real_gptq(*args, damp=damp, **kwargs)

    def spy_seq(*args, sink_weight, **kwargs):
        seen["sink"] = sink_weight
        return real_seq(*args, sink_weight=sink_weight, **kwargs)

    monkeypatch.setattr(awq, "awq_transform", spy_awq)
    monkeypatch.setattr(sequential, "sequential_quantize", spy_seq)
    monkeypatch.setattr(gptq, "gptq_quantize", spy_gptq)
    cal = Calibration(awq="scale", gptq="more", mse=True, sequential=True, samples=2, damp=0.05,
                      awq_more=True, sink_weight=4.0)
    monkeypatch.setitem(CALIBRATIONS, "more-test", cal)
    quantize_checkpoint(src, str(tmp_path / "q"), "gptq", group_size=GROUP, calibration="more-test")
    text = calibration_text_ids(src)
    with open(os.path.join(src, "config.json")) as f:
        bos = json.load(f)["bos_token_id"]
    assert seen["awq"][: len(text)] == text and len(seen["awq"]) == len(text) + 2
    assert all(len(w) == 512 and w[0] == bos for w in seen["awq"][len(text) :])
    assert seen["damp"] == {0.05} and seen["sink"] == 4.0
