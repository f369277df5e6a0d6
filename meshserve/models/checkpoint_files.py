"""Reading an HF checkpoint folder: its config, its safetensors files and the tensors they hold.

File-level only: placing tensors into a model is loader.py's load_tensors.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

from meshserve.distributed.parallel_state import get_parallel_state
from meshserve.errors import ModelLoadError


def load_hf_config(path: str):
    """The config of the folder `path` (its config.json, read locally only; transformers' fields,
    models/hf_config.py); a one-line ModelLoadError when it cannot be read."""
    from meshserve.models.hf_config import config_from_folder

    try:
        return config_from_folder(path)
    except Exception as e:  # transformers raises many types here; the user needs one line
        raise ModelLoadError(f"cannot read the model config in {path}: {str(e).splitlines()[0]}") from e


def safetensors_files(path: str) -> list[str]:
    """Paths of the folder's weight files, sorted: the shards its model.safetensors.index.json lists, else
    every *.safetensors in it. A missing shard, a corrupt index or no weights at all is a ModelLoadError."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"corrupt safetensors index {index}: {e}") from e
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelLoadError(f"missing weight shard {os.path.basename(missing[0])} listed in {index}")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    return files


def iter_checkpoint(path: str) -> Iterator[tuple[str, object]]:
    """(name, lazy safetensors slice) of every tensor in the folder's safetensors files, file by file: nothing
    is read until sliced (`part[:]` reads it all, `part.get_shape()` only the header). An unreadable file is a
    ModelLoadError naming it."""
    from safetensors import safe_open
    from tqdm import tqdm

    files = safetensors_files(path)
    # a bar on a terminal (rank 0 only: the ranks load side by side); the summary line is logged after
    show = get_parallel_state().rank == 0 and len(files) > 1
    for file in tqdm(files, desc="loading safetensors shards", unit="file", disable=None if show else True):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                    # a lazy slice: weight loaders read only this rank's part of the tensor
                    yield name, f.get_slice(name)
        except ModelLoadError:
            raise
        except Exception as e:  # SafetensorError, OSError, truncated headers ...
            raise ModelLoadError(f"corrupt weights file {file}: {str(e).splitlines()[0]}") from e
