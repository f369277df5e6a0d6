"""A model folder for measuring structured outputs with dummy weights: a real architecture (Llama-3.1-8B,
Qwen3-0.6B) whose vocabulary is SmolLM2's 49,152 tokens, with SmolLM2's real tokenizer (byte-level BPE, chat
template, special tokens) taken from the embedded GGUF (through meshserve's cached conversion of it).

A word-level tokenizer ("w17") cannot spell JSON, so a grammar over it measures nothing; SmolLM2's can. The
folder holds config.json and the tokenizer files only (about 3.5 MB): small enough to travel to the GPU
machine, where meshserve and vLLM both load it with `--load-format dummy` (random weights, no download).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from meshserve.models.presets import PRESETS

logger = logging.getLogger(__name__)

SMOL_VOCAB_SIZE = 49152
# SmolLM2's special tokens: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2 (the chat's end of turn)
SMOL_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
ARCHS = ("llama-3.1-8b", "qwen3-0.6b")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def folder_name(arch: str) -> str:
    """The folder (and served model) name for an architecture: "llama-3.1-8b-smol"."""
    return f"{arch}-smol"


def structured_model_config(arch: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of `arch` (a preset name) with SmolLM2's vocabulary size and special token ids; `overrides`
    last (tests shrink the layers with it)."""
    if arch not in PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; one of: {', '.join(PRESETS)}")
    config = {**PRESETS[arch], "vocab_size": SMOL_VOCAB_SIZE, **SMOL_TOKEN_IDS}
    config.update(overrides or {})
    return config


def write_smol_tokenizer(out_dir: str | Path, gguf_path: str | Path | None = None) -> Path:
    """SmolLM2's tokenizer files into `out_dir`, from meshserve's Hugging Face folder of the GGUF (default: the
    embedded one), which gguf_convert.py writes once into the cache (the tokenizer read from the GGUF with
    transformers, its chat template inside tokenizer_config.json).

    tokenizer_config.json names the class PreTrainedTokenizerFast, which transformers 4.x and 5.x both load
    (5.x writes its own TokenizersBackend, unknown to 4.x)."""
    from tokenizers import Tokenizer

    from meshserve.models.gguf_cache import cached_hf_dir_for_gguf

    if gguf_path is None:
        from meshserve.models.embedded import find_embedded_gguf

        gguf_path = find_embedded_gguf()
    src = cached_hf_dir_for_gguf(gguf_path)
    vocab = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size()
    if vocab != SMOL_VOCAB_SIZE:
        raise ValueError(f"{Path(gguf_path).name} has a vocabulary of {vocab}, not SmolLM2's {SMOL_VOCAB_SIZE}")
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    if not tok_config.get("chat_template"):
        raise ValueError(f"{Path(gguf_path).name} carries no chat template")
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("backend", "is_local", "local_files_only"):  # 5.x bookkeeping, meaningless in another place
        tok_config.pop(key, None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    return out


def build_structured_model(arch: str, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                           overrides: dict[str, Any] | None = None) -> Path:
    """Write config.json for `arch` and SmolLM2's tokenizer into `out_dir` (tokenizer files copied from
    `tokenizer_dir` when given, else extracted from the embedded GGUF)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        write_smol_tokenizer(out)
    elif Path(tokenizer_dir).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            (out / name).write_bytes((Path(tokenizer_dir) / name).read_bytes())
    (out / "config.json").write_text(json.dumps(structured_model_config(arch, overrides), indent=1) + "\n")
    logger.info("wrote %s (%s, vocabulary %d)", out, arch, SMOL_VOCAB_SIZE)
    return out


def folder_bytes(path: str | Path) -> int:
    """Total size of the files in a folder (what a device call's carry would move)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
