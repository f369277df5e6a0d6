"""The checkpoint names and shapes of an architecture, kept on disk across starts.

Dummy weights are drawn at the checkpoint's full shapes (loader.checkpoint_shapes), which come from the HF
model class built on the meta device: instant itself, but importing transformers' modeling code for it cost
1.5-2 s of every start-up on dummy weights. The answer depends only on the config and the transformers
version, so it is stored as JSON under the meshserve cache (MESHSERVE_CACHE_DIR), named by their digest.
A missing, unreadable or unwritable cache only means computing it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def _path(key: str) -> Path:
    from meshserve.models.gguf_cache import cache_dir
    from meshserve.models.hf_config import transformers_version

    # the version from the package metadata: importing transformers for it would cost what this cache saves
    digest = hashlib.sha256(f"{transformers_version()}\n{key}".encode()).hexdigest()[:24]
    return cache_dir() / "checkpoint-shapes" / f"{digest}.json"


def load(key: str) -> dict[str, tuple[int, ...]] | None:
    """The shapes stored for key (a config's class and JSON), or None."""
    try:
        with open(_path(key)) as f:
            stored = json.load(f)
        if stored.get("key") != key:  # a digest collision or a foreign file: not ours
            return None
        return {name: tuple(shape) for name, shape in stored["shapes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def store(key: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """Write atomically (a temporary file renamed), so a reader never sees half of it; errors are ignored."""
    try:
        path = _path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "shapes": {n: list(s) for n, s in shapes.items()}}, f)
        os.replace(tmp, path)
    except OSError as e:
        logger.debug("checkpoint shapes not cached: %s", e)
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)
