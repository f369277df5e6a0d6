"""Checks of engine arguments that need no torch and no weights: run before anything slow starts.

`meshserve generate` and `meshserve serve` call `check_engine_args` first, so a bad flag, a missing model
path or a layout the model cannot take is reported in a fraction of a second, not after the engine process
has imported torch and begun loading. `create_engine_config` checks all of it again, with the full config.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

from meshserve.cli_paths import check_output_file, check_output_folder
from meshserve.config import EngineArgs
from meshserve.engine.kv_offload.disk_space import check_disk_tier_args
from meshserve.errors import InvalidArgumentError, ModelLoadError
from meshserve.models.moe_config import check_moe_split
from meshserve.models.quant_config import check_weight_format


def check_parallel_split(hf_config, tp: int, pp: int, partition: list[int] | None,
                         expert_parallel: bool = False) -> None:
    """Reject a TP/PP(/EP) layout the model's shapes cannot take, before any process starts."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % tp:
        raise InvalidArgumentError(f"tensor_parallel_size {tp}: {heads} attention heads are not divisible by it",
                                   param="tensor_parallel_size")
    if kv_heads % tp and tp % kv_heads:
        raise InvalidArgumentError(f"tensor_parallel_size {tp}: {kv_heads} KV heads can neither be split nor "
                                   "replicated evenly", param="tensor_parallel_size")
    if hf_config.intermediate_size % tp:
        raise InvalidArgumentError(f"tensor_parallel_size {tp}: intermediate size {hf_config.intermediate_size} "
                                   "is not divisible by it", param="tensor_parallel_size")
    check_moe_split(hf_config, tp, expert_parallel)
    layers = hf_config.num_hidden_layers
    if partition is not None:
        if len(partition) != pp or sum(partition) != layers or min(partition) < 1:
            raise InvalidArgumentError(f"pp_layer_partition {partition} must list {pp} stages of >= 1 layer "
                                       f"summing to {layers}", param="pp_layer_partition")
    elif layers < pp:
        raise InvalidArgumentError(f"pipeline_parallel_size {pp} exceeds the {layers} layers",
                                   param="pipeline_parallel_size")



# a folder AutoTokenizer can load holds one of these (fast, config, sentencepiece, byte-level BPE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _config_fields(model: str) -> dict | None:
    """config.json of a model folder (or a config file given with --load-format dummy), else None."""
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not (os.path.isfile(path) and path.endswith(".json")):
        return None
    try:
        with open(path) as f:
            fields = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the model config {path}: {e}") from e
    if not isinstance(fields, dict):  # a list or a number was an AttributeError traceback
        raise ModelLoadError(f"the model config {path} must be a JSON object of fields, got "
                             f"{type(fields).__name__}")
    return fields


def _check_generation_config(mode: str) -> None:
    """A folder named by --generation-config holds a JSON object (the engine only warns about the model's own
    unreadable file, which the user did not name)."""
    if mode in ("auto", "vllm"):
        return
    path = os.path.join(mode, "generation_config.json")
    try:
        with open(path) as f:
            fields = json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"--generation-config {mode}: cannot read {path}: {str(e).splitlines()[0]}",
                                   param="generation_config") from None
    if not isinstance(fields, dict):
        raise InvalidArgumentError(f"--generation-config {mode}: {path} must hold a JSON object",
                                   param="generation_config")


def check_engine_args(args: EngineArgs) -> None:
    """Validate flags, the model's path and the TP/PP layout against its config; raises MeshserveError."""
    args.validate()
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # its environment places the ranks
    if args.nnodes > 1 and world % args.nnodes and not torchrun:  # as launch_info refuses it, but before loading;
        # with one rank in all, --nnodes 2 --node-rank 1 served a whole server of its own on the "worker" node
        raise InvalidArgumentError(f"--nnodes {args.nnodes}: the {world} rank(s) of --tensor-parallel-size x "
                                   f"--pipeline-parallel-size do not split evenly over {args.nnodes} nodes",
                                   param="nnodes")
    check_output_file(args.step_trace, "--step-trace")
    _check_generation_config(args.generation_config)
    check_output_folder(args.kv_offloading_disk_path, "--kv-offloading-disk-path")
    check_disk_tier_args(args.kv_offloading_disk_path, args.kv_offloading_disk_size)  # fits its free space
    if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
        raise ModelLoadError(f"tokenizer folder not found: {args.tokenizer}")
    if args.tokenizer is not None and not any(os.path.isfile(os.path.join(args.tokenizer, name))
                                              for name in TOKENIZER_FILES):
        raise ModelLoadError(f"--tokenizer {args.tokenizer}: no tokenizer in the folder (none of "
                             f"{', '.join(TOKENIZER_FILES)})")
    model = args.model
    if model is None:
        return  # the embedded model: its checks need its GGUF, which the engine reads anyway
    fields = None
    if os.path.exists(model):
        if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
            raise ModelLoadError(f"no config.json in the model folder {model}")
        fields = _config_fields(model)
    elif model.endswith(".gguf"):
        raise ModelLoadError(f"GGUF file not found: {model}")
    else:
        from meshserve.models.presets import PRESETS, preset_names

        if model.lower() not in PRESETS:
            raise ModelLoadError(f"model not found: {model} is not a model folder, a .gguf file or a preset "
                                 f"({', '.join(preset_names())})")
        if args.load_format != "dummy":
            raise ModelLoadError(f"{model} is an architecture preset without weights: add --load-format dummy")
        fields = dict(PRESETS[model.lower()])
    if fields is not None:
        check_weight_format(fields.get("quantization_config"), model, args.load_format)
    if fields is not None and all(k in fields for k in ("num_attention_heads", "intermediate_size",
                                                        "num_hidden_layers")):
        fields = {**fields, **args.hf_overrides}
        check_parallel_split(SimpleNamespace(**fields), args.tensor_parallel_size, args.pipeline_parallel_size,
                             args.pp_layer_partition, args.enable_expert_parallel)
