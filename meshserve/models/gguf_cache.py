"""The on-disk cache of GGUF files converted to Hugging Face folders, keyed by the file's content.

Each virtualenv installs its own copy of the embedded model's GGUF (a new path, a new mtime); keyed by
content, every copy finds the one conversion (hundreds of MB, seconds of work) made by the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from meshserve.errors import ModelLoadError
from meshserve.models import gguf_convert
from meshserve.models.file_digest import cached_sha256

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of meshserve's on-disk cache.

    $MESHSERVE_CACHE_DIR if set, else $XDG_CACHE_HOME/meshserve, else ~/.cache/meshserve.
    """
    if explicit := os.environ.get("MESHSERVE_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "meshserve"
    return Path.home() / ".cache" / "meshserve"


def cached_hf_dir_for_gguf(gguf_path: str | Path, progress: bool = True) -> Path:
    """The HF folder converted from `gguf_path`, converting it into the cache on first use.

    The folder is named by the SHA-256 of the file's content (the digest Hugging Face lists for the file) and
    the converter version: a copy of the file elsewhere reuses it, a changed file gets a fresh conversion.
    """
    path = gguf_convert.check_file(gguf_path)
    root = cache_dir() / "gguf"
    digest = cached_sha256(path, root / "digests")
    target = root / f"{digest[:20]}-v{gguf_convert.CONVERTER_VERSION}"
    if (target / gguf_convert.MARKER_FILE).is_file():
        logger.debug("Using cached conversion %s of %s", target, path)
        return target

    try:
        root.mkdir(parents=True, exist_ok=True)
        # Two processes starting together must not both convert (or swap folders under each other); the
        # conversion itself is written to a temporary folder and renamed, so no reader sees half of it.
        with _file_lock(target.with_name(target.name + ".lock")):
            if (target / gguf_convert.MARKER_FILE).is_file():
                return target
            # Holding the lock, any temporary sibling is debris from a conversion that was killed.
            for stale in root.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            logger.info("Converting %s to a Hugging Face folder in %s (done once per file content)", path, target)
            return gguf_convert.convert_gguf_to_hf(path, target, progress=progress)
    except OSError as e:  # MESHSERVE_CACHE_DIR naming a file, a read-only home, a full disk: one line, no traceback
        raise ModelLoadError(f"cannot write the converted model under {root} ({e.strerror or e}): set "
                             "MESHSERVE_CACHE_DIR to a writable folder") from e


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
