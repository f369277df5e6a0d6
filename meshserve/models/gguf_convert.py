"""Convert a llama.cpp GGUF checkpoint into a Hugging Face model folder, and cache the result.

meshserve's loaders read HF folders (config.json + safetensors + tokenizer.json), so a GGUF file is
converted once, dequantized to float32, into a cache folder (gguf_cache.py) that every later start reuses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meshserve.errors import ModelLoadError, UnsupportedModelError
from meshserve.models.convert_progress import ConversionProgress

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

# Bump when the output changes, so caches written by an older converter are rebuilt.
# 2: sampling defaults (general.sampling.*) go into generation_config.json.
CONVERTER_VERSION = 2
# Written last into a finished folder; a cache folder without it is never trusted.
MARKER_FILE = ".meshserve-gguf-converted.json"
# Tensors are flushed to disk in shards of about this size, so peak memory stays bounded for big models.
MAX_SHARD_BYTES = 4 << 30

# GGUF architecture -> (transformers config class name, HF architectures entry).
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}

# GGUF per-layer tensor base name -> HF module path inside model.layers.N.
_LAYER_TENSORS: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# llama.cpp's general.sampling.<key> -> generation_config.json field.
_SAMPLING_KEYS: dict[str, str] = {
    "temp": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "penalty_repeat": "repetition_penalty",
}
_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Convert a GGUF file into an HF folder at `out_dir` (replacing it) and return `out_dir`.

    Every tensor is dequantized to float32. The folder gets config.json, generation_config.json,
    model.safetensors (sharded past MAX_SHARD_BYTES), and the tokenizer with its chat template.
    The work happens in a temporary sibling folder that is renamed into place at the end, so an
    interrupted conversion never leaves a half-written folder behind.
    """
    path = check_file(gguf_path)
    out = Path(out_dir).expanduser().absolute()
    bar = ConversionProgress(path.name, enabled=progress)
    tmp: Path | None = None
    try:
        bar.phase("reading the GGUF")
        reader = _open_reader(path)
        arch = _architecture(reader, path)
        bar.set_tensors(len(reader.tensors))
        bar.phase("building the config")
        config = _build_config(reader, arch, path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        _write_weights(reader, arch, config, path, tmp, bar)
        config.save_pretrained(tmp)
        _write_generation_config(reader, tmp)
        bar.phase("building the tokenizer")
        _write_tokenizer(reader, path, tmp)
        marker = {"source": str(path), "size": path.stat().st_size, "converter_version": CONVERTER_VERSION}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2))
        _make_readable(tmp)
        _move_into_place(tmp, out)
        bar.phase("done")
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    logger.info("Converted %s -> %s", path, out)
    return out


def check_file(gguf_path: str | Path) -> Path:
    path = Path(gguf_path).expanduser().absolute()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    return path


def _open_reader(path: Path) -> gguf.GGUFReader:
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors/etc. for anything malformed
        raise ModelLoadError(f"not a valid GGUF file: {path} ({type(e).__name__}: {e})") from e


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _architecture(reader: gguf.GGUFReader, path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r} in {path.name}; supported: {', '.join(_ARCHITECTURES)}"
        )
    return arch


def _build_config(reader: gguf.GGUFReader, arch: str, path: Path) -> Any:
    """A transformers config for the checkpoint, from the GGUF metadata and tensor list."""
    import transformers

    def required(key: str) -> Any:
        value = _field(reader, key.format(arch=arch))
        if value is None:
            raise ModelLoadError(f"GGUF file {path.name} lacks metadata key {key.format(arch=arch)!r}")
        return value

    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp stores llama3-style rope scaling as per-frequency factors; rebuilding HF's
        # llama3 parameters from them is not implemented, and ignoring them would be silently wrong.
        raise UnsupportedModelError(
            f"GGUF file {path.name} uses rope_freqs (llama3 rope scaling), not supported"
        )

    n_head = int(required("{arch}.attention.head_count"))
    n_head_kv = _single_value(
        _field(reader, f"{arch}.attention.head_count_kv", n_head), "head_count_kv", path
    )
    hidden = int(required("{arch}.embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_head))
    rope_dim = _field(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise UnsupportedModelError(
            f"GGUF file {path.name} uses partial rotary ({rope_dim} of {head_dim} dims)"
        )

    kwargs: dict[str, Any] = {
        "vocab_size": _vocab_size(reader, path),
        "hidden_size": hidden,
        "intermediate_size": int(required("{arch}.feed_forward_length")),
        "num_hidden_layers": int(required("{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        # Legacy names: transformers 5 folds them into rope_parameters and 4.x reads them directly.
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader, arch, path),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        kwargs["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    elif arch == "qwen2":
        del kwargs["head_dim"]  # Qwen2 always derives it from hidden_size / heads
    elif arch == "qwen3":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names

    config_cls_name, hf_arch = _ARCHITECTURES[arch]
    config = getattr(transformers, config_cls_name)(**kwargs)
    config.architectures = [hf_arch]
    return config


def _single_value(value: Any, what: str, path: Path) -> int:
    """llama.cpp may store a per-layer array; HF configs need one number."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(
                f"GGUF file {path.name} has a per-layer {what} {value}, not supported"
            )
        value = value[0]
    return int(value)


def _vocab_size(reader: gguf.GGUFReader, path: Path) -> int:
    # The embedding's row count is what the weights need; the token list should agree with it.
    tokens = reader.get_field("tokenizer.ggml.tokens")
    n_tokens = len(tokens.data) if tokens is not None else None
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelLoadError(f"GGUF file {path.name} has no token_embd.weight tensor")
    rows = int(embd.shape[-1])  # GGUF lists dimensions innermost first
    if n_tokens is not None and n_tokens != rows:
        logger.warning("%s: %d tokens but %d embedding rows; using %d", path.name, n_tokens, rows, rows)
    return rows


def _rope_scaling(reader: gguf.GGUFReader, arch: str, path: Path) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = _field(reader, f"{arch}.rope.scaling.factor") or _field(reader, f"{arch}.rope.scale_linear")
    if kind == "none" and factor is not None and float(factor) != 1.0:
        kind = "linear"  # older files only wrote rope.scale_linear
    if kind == "none" or factor is None:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        if (orig := _field(reader, f"{arch}.rope.scaling.original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        return scaling
    raise UnsupportedModelError(f"GGUF file {path.name} uses rope scaling type {kind!r}, not supported")


def _hf_name(gguf_name: str, path: Path) -> str:
    base, _, suffix = gguf_name.rpartition(".")  # suffix is "weight" or "bias"
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    raise UnsupportedModelError(
        f"GGUF file {path.name} has tensor {gguf_name!r} with no Hugging Face equivalent"
    )


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows from HF's half-split rotary layout to interleaved pairs.

    llama.cpp views each head's rows as (2, head_dim/2) and swaps those axes; swapping them back
    restores HF's order. Works for weights [out, in] and biases [out] alike.
    """
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _iter_hf_tensors(
    reader: gguf.GGUFReader, arch: str, config: Any, path: Path, bar: ConversionProgress
) -> Iterator[tuple[str, np.ndarray]]:
    import gguf

    bar.phase("dequantizing tensors")
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, path)
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"GGUF tensor {tensor.name} in {path.name} uses {tensor.tensor_type.name}, "
                "which cannot be dequantized"
            ) from e
        # GGUF lists dimensions innermost first; HF wants [out, in].
        array = array.astype(np.float32, copy=False).reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = _unpermute_rotary(array, config.num_attention_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = _unpermute_rotary(array, config.num_key_value_heads)
        # F32 tensors come back as views of the read-only memory map; copy them into owned memory.
        yield name, np.ascontiguousarray(array) if array.flags.writeable else array.copy()
        bar.tensor_done()


def _write_weights(
    reader: gguf.GGUFReader, arch: str, config: Any, path: Path, out: Path, bar: ConversionProgress
) -> None:
    from safetensors.numpy import save_file

    shards: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    pending_bytes = 0
    total_bytes = 0

    def flush(last: bool) -> None:
        nonlocal pending, pending_bytes
        bar.phase(f"writing {pending_bytes / 1e6:.0f} MB of weights")
        save_file(pending, str(out / f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
        shards.append(list(pending))
        pending, pending_bytes = {}, 0
        if not last:
            bar.phase("dequantizing tensors")

    for name, array in _iter_hf_tensors(reader, arch, config, path, bar):
        if pending and pending_bytes + array.nbytes > MAX_SHARD_BYTES:
            flush(last=False)
        pending[name] = array
        pending_bytes += array.nbytes
        total_bytes += array.nbytes
    if pending or not shards:
        flush(last=True)

    if len(shards) == 1:
        os.replace(out / "shard-00000.safetensors", out / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / f"shard-{i:05d}.safetensors", out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_generation_config(reader: gguf.GGUFReader, out: Path) -> None:
    from transformers import GenerationConfig

    # Chat models often end a turn with a separate end-of-turn token; generation must stop on both.
    eos = [
        int(v)
        for key in (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        )
        if (v := _field(reader, key)) is not None
    ]
    eos = list(dict.fromkeys(eos))
    # The creator's recommended sampling, where the file has it, becomes the serving defaults (as vLLM
    # reads generation_config.json); HF ignores temperature & co. unless do_sample is set.
    sampling = {hf: _field(reader, f"general.sampling.{key}") for key, hf in _SAMPLING_KEYS.items()}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    GenerationConfig(
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None,
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        **({"do_sample": True, **sampling} if sampling else {}),
    ).save_pretrained(out)


def _write_tokenizer(reader: gguf.GGUFReader, path: Path, out: Path) -> None:
    if reader.get_field("tokenizer.ggml.model") is None:
        logger.warning("%s has no tokenizer; the converted folder has weights and config only", path.name)
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises many types for vocabularies it cannot rebuild
        raise ModelLoadError(f"cannot build a tokenizer from {path.name}: {type(e).__name__}: {e}") from e
    if tokenizer.chat_template is None and (template := _field(reader, "tokenizer.chat_template")):
        tokenizer.chat_template = template
    # Keep the template inside tokenizer_config.json, where both transformers 4.x and 5.x find it.
    tokenizer.save_pretrained(out, save_jinja_files=False)


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700 (and safetensors may write 0600); a cache may be shared, so open it up to read."""
    folder.chmod(0o755)
    for child in folder.iterdir():
        child.chmod(0o644)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` is swapped aside first, then deleted."""
    old: Path | None = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "previous")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
