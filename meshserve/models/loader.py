"""Finds a model (HF folder, GGUF file, preset, embedded default) and loads its weights into our classes."""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from meshserve.engine import startup_timeline
from meshserve.errors import ModelLoadError
from meshserve.layers.quantization import quantization_scope, resolve_quant_config
from meshserve.layers.quantization.kv_scales import is_kv_scale, load_kv_scale
from meshserve.models import shapes_cache
from meshserve.models.checkpoint_files import iter_checkpoint, load_hf_config
from meshserve.models.dense_shapes import dense_checkpoint_shapes
from meshserve.models.presets import PRESETS, preset_config, preset_names
from meshserve.models.registry import resolve_model_class

logger = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """Where a model's config, weights and tokenizer come from."""

    name: str  # what the user asked for (shown in logs and /v1/models)
    hf_config: object
    weights_dir: str | None  # None for dummy weights
    tokenizer_dir: str | None  # None when there is no tokenizer (dummy presets)
    # dummy weights: the checkpoint's tensor names and full shapes, filled once by with_checkpoint_shapes so
    # that ranks given this source need not import transformers' modeling code to derive them
    checkpoint_shapes: dict[str, tuple[int, ...]] | None = None


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


_GGUF_FORMATS = ("auto", "gguf", "dummy")  # the load formats that can read a GGUF file


def resolve_model_source(model: str | None, load_format: str = "auto", tokenizer: str | None = None) -> ModelSource:
    """Turn the `model` argument into a ModelSource.

    model may be None (the embedded default), an HF folder, a .gguf file (converted once and cached),
    a preset name (dummy weights only) or, with load_format="dummy", a config.json / folder holding one.
    """
    if model is None:
        from meshserve.models.embedded import DEFAULT_MODEL_NAME, resolve_default_model

        if load_format not in _GGUF_FORMATS:
            raise ModelLoadError(f"--load-format {load_format} cannot read the embedded default model "
                                 f"{DEFAULT_MODEL_NAME} (a GGUF file): use auto or gguf")
        path = resolve_default_model()
        return ModelSource(DEFAULT_MODEL_NAME, load_hf_config(path),
                           None if load_format == "dummy" else path, tokenizer or path)

    if model.lower() in PRESETS and not os.path.exists(model):
        if load_format != "dummy":
            raise ModelLoadError(f"{model} is an architecture preset without weights: add --load-format dummy")
        return ModelSource(model, preset_config(model), None, tokenizer)

    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ModelLoadError(f"GGUF file not found: {model}")
        if load_format not in _GGUF_FORMATS:
            raise ModelLoadError(f"--load-format {load_format} cannot read the GGUF file {model}: use auto or gguf")
        from meshserve.models.gguf_cache import cached_hf_dir_for_gguf

        path = str(cached_hf_dir_for_gguf(model))
        return ModelSource(model, load_hf_config(path), None if load_format == "dummy" else path,
                           tokenizer or path)

    if os.path.isfile(model) and model.endswith(".json") and load_format == "dummy":
        from meshserve.models.hf_config import config_for_model

        with open(model) as f:
            fields = json.load(f)
        try:
            config = config_for_model(fields.pop("model_type"), fields)
        except Exception as e:
            raise ModelLoadError(f"cannot read the model config {model}: {str(e).splitlines()[0]}") from e
        return ModelSource(model, config, None, tokenizer)

    if not os.path.isdir(model):
        raise ModelLoadError(
            f"model not found: {model} is not a model folder, a .gguf file or a preset "
            f"({', '.join(preset_names())})"
        )
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ModelLoadError(f"no config.json in the model folder {model}")
    if load_format == "gguf":
        raise ModelLoadError(f"--load-format gguf cannot read the model folder {model} (GGUF is a .gguf file): "
                             "use auto or safetensors")
    tok = tokenizer or (model if _has_tokenizer(model) else None)
    return ModelSource(model, load_hf_config(model), None if load_format == "dummy" else model, tok)


def load_weights(model: nn.Module, path: str) -> None:
    """Copy every checkpoint tensor into its (possibly merged, possibly sharded) parameter."""
    t0 = time.perf_counter()
    load_tensors(model, iter_checkpoint(path), f"checkpoint in {path}")
    logger.info("loaded %.2f GB of weights from %s in %.1f s", weight_bytes(model) / 1e9, path,
                time.perf_counter() - t0)


def load_tensors(model: nn.Module, tensors: Iterable[tuple[str, object]], what: str) -> None:
    """Copy each (checkpoint name, tensor or lazy slice) of `tensors` into its (possibly merged, sharded or
    stacked-expert) parameter of `model`, then run each module's process_weights_after_loading. A tensor
    with no place, a missing one or a shape mismatch is a ModelLoadError naming `what` or the tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    place = getattr(model, "checkpoint_name", lambda n: n)
    # MoE models: an expert's tensor -> (stacked parameter, (expert id, part)) (layers/fused_moe.py)
    expert_place = getattr(model, "expert_checkpoint_name", lambda n: None)
    loaded: set[str] = set()
    for ckpt_name, tensor in tensors:
        if "rotary_emb.inv_freq" in ckpt_name:
            continue
        name = place(ckpt_name)
        if name is None:  # another pipeline stage's (or a tied) tensor
            continue
        if is_kv_scale(name):
            _load_or_fail(ckpt_name, load_kv_scale, model, name, tensor)
            continue
        shard_id = None
        expert = expert_place(name)
        if expert is not None:
            name, shard_id = expert
        for ckpt_part, (our_part, sid) in packed.items() if expert is None else ():
            if f".{ckpt_part}." in name:
                name, shard_id = name.replace(f".{ckpt_part}.", f".{our_part}."), sid
                break
        param = params.get(name)
        if param is None:
            raise ModelLoadError(f"checkpoint tensor {ckpt_name} has no place in {type(model).__name__}")
        loader = getattr(param, "weight_loader", None)
        with torch.no_grad():
            if loader is None:
                _load_or_fail(ckpt_name, param.data.copy_, tensor[:])
            elif shard_id is None:
                _load_or_fail(ckpt_name, loader, param, tensor)
            else:
                _load_or_fail(ckpt_name, loader, param, tensor, shard_id)
        loaded.add(name)
    tied_head = getattr(model, "tie_word_embeddings", False)
    expected = {n for n, p in params.items() if not getattr(p, "optional", False) and not (
        tied_head and n.startswith("lm_head.") and "model.embed_tokens.weight" in params)}
    missing = sorted(expected - loaded)
    quant = getattr(model, "quant_config", None)
    if missing:
        fmt = f" (weight format {quant.name})" if quant is not None else ""
        raise ModelLoadError(f"{what} lacks {len(missing)} tensors, e.g. {missing[0]}{fmt}")
    with torch.no_grad():
        for name, module in model.named_modules():
            process = getattr(module, "process_weights_after_loading", None)
            if process is not None:
                _load_or_fail(name, process)


def _load_or_fail(name: str, load, *args) -> None:
    """load(*args), one load step; a shape or format mismatch becomes a one-line error naming the tensor."""
    try:
        load(*args)
    except (RuntimeError, ValueError) as e:
        raise ModelLoadError(f"cannot load {name}: {str(e).splitlines()[0]}") from e


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights, tensors shared between modules (tied embeddings) counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def active_weight_bytes(model: nn.Module) -> int:
    """Bytes one token's step reads: all weights but, in MoE layers, only top_k of the experts (each layer's
    `expert_weight_bytes_skipped`); equals weight_bytes for dense models."""
    skipped = sum(m.expert_weight_bytes_skipped() for m in model.modules()
                  if hasattr(m, "expert_weight_bytes_skipped"))
    return weight_bytes(model) - skipped


_CHECKPOINT_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def checkpoint_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors' names and full shapes for hf_config's architecture: for the dense families
    from the config's fields (dense_shapes.py), else from the HF class built on the meta device, cached per
    config (its class and JSON) in this process and on disk (shapes_cache.py). The build itself is instant,
    but importing transformers' modeling code (generation utils, masking, torch._dynamo) costs ~1.5 s of a
    quiet CPU, more on a cold start."""
    key = f"{type(hf_config).__name__}:{hf_config.to_json_string(use_diff=False)}"
    if key not in _CHECKPOINT_SHAPES:
        shapes = dense_checkpoint_shapes(hf_config) or shapes_cache.load(key)
        if shapes is None:
            from transformers import AutoModelForCausalLM

            from meshserve.models.config_snapshot import as_hf_config

            with torch.device("meta"):
                state = AutoModelForCausalLM.from_config(as_hf_config(hf_config)).state_dict()
            shapes = {n: tuple(t.shape) for n, t in state.items()}
            shapes_cache.store(key, shapes)
        _CHECKPOINT_SHAPES[key] = shapes
    return _CHECKPOINT_SHAPES[key]


def with_checkpoint_shapes(source: ModelSource) -> ModelSource:
    """source, carrying its checkpoint's names and shapes when its weights are dummy: computed once here
    (by the driver) rather than in every rank that loads them."""
    if source.weights_dir is not None or source.checkpoint_shapes is not None:
        return source
    return replace(source, checkpoint_shapes=checkpoint_shapes(source.hf_config))


def _dummy_checkpoint(model: nn.Module, shapes: dict[str, tuple[int, ...]], seed: int):
    """The checkpoint tensors named in `shapes` (at their full shapes), each drawn on the model's device from
    a seed of its own name: N(0, 0.02) matrices, unit norms, zero biases. Only tensors this stage places
    are drawn.

    MESHSERVE_DUMMY_WEIGHTS=vllm draws as vLLM 0.26's dummy loader does instead, for A/Bs against it: every
    tensor, norms included, uniform in [-1e-3, 1e-3] from one seed (1234) for all, so every layer's MoE router
    is the same draw (vLLM's fused tensors hold several of ours, so the values differ; the distribution and
    the shared seed do not). Under that draw vLLM's DeepSeek routing (a bf16 softmax and top-k) gives every
    token the same experts, where ours (float32, as HF's) still spreads them: BENCHMARKS.md, twenty-eighth
    session."""
    place = getattr(model, "checkpoint_name", lambda n: n)
    first = next(model.parameters())
    gen = torch.Generator(device=first.device)
    like_vllm = os.environ.get("MESHSERVE_DUMMY_WEIGHTS", "") == "vllm"
    for name, shape in shapes.items():
        if place(name) is None:
            continue
        tensor = torch.empty(shape, dtype=first.dtype, device=first.device)
        if like_vllm:
            gen.manual_seed(1234)
            tensor.uniform_(-1e-3, 1e-3, generator=gen)
        elif tensor.dim() == 1:
            tensor.fill_(0.0 if name.endswith("bias") else 1.0)
        else:
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            tensor.normal_(0.0, 0.02, generator=gen)
        yield name, tensor


def init_dummy_weights(model: nn.Module, hf_config, seed: int = 0,
                       shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Random weights at the real shapes, the same under every parallel layout: each full checkpoint tensor
    is drawn from its own seed and sharded like a real checkpoint (so TP/PP runs on dummy weights give one
    device's tokens, and their speed is that of real weights). shapes: checkpoint_shapes(hf_config), if
    the caller has them."""
    shapes = checkpoint_shapes(hf_config) if shapes is None else shapes
    load_tensors(model, _dummy_checkpoint(model, shapes, seed), "dummy checkpoint")


def build_model(source: ModelSource, dtype: torch.dtype, device: torch.device, max_position: int,
                seed: int = 0, quantization: str | None = None) -> nn.Module:
    """Instantiate the model class on `device` in `dtype` (its linear layers in the weight format that
    `quantization` and the checkpoint's quantization_config resolve to) and fill its weights."""
    cls = resolve_model_class(source.hf_config)
    quant_config = resolve_quant_config(source.hf_config, quantization,
                                        "dummy" if source.weights_dir is None else "auto")
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), quantization_scope(quant_config):
            model = cls(source.hf_config, max_position=max_position)
    except ValueError as e:  # a layer refusing its shape (TP split, int4 packing): one line
        raise ModelLoadError(str(e).splitlines()[0]) from e
    finally:
        torch.set_default_dtype(old_dtype)
    model.quant_config = quant_config
    if quant_config is not None:
        logger.info("weights: %s", quant_config.describe())
    startup_timeline.mark("model built", sync=device)
    if source.weights_dir is None:
        init_dummy_weights(model, source.hf_config, seed, source.checkpoint_shapes)
    else:
        load_weights(model, source.weights_dir)
    startup_timeline.mark("dummy weights" if source.weights_dir is None else "weights", sync=device)
    return model.eval()
