"""A file's SHA-256, remembered beside a cache so an unchanged file is read only once.

Keys by content let two copies of one file (each virtualenv installs its own) share a cache entry.
Hashing a few hundred MB takes a fraction of a second, yet every start would pay it, so the digest is kept
in a small memo keyed by the file's path, size, mtime and inode: any change to those hashes it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

_CHUNK = 8 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> dict[str, int | str]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "dev": st.st_dev}


def cached_sha256(path: Path, memo_dir: Path) -> str:
    """SHA-256 of `path`'s content; the memo in `memo_dir` answers while the file's stat is unchanged."""
    path = path.absolute()
    memo = memo_dir / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json"
    stamp = _stamp(path)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp:
            return saved["sha256"]
    digest = sha256_of(path)
    if _stamp(path) == stamp:  # a file written to while we read it gets no memo
        _write_atomically(memo, json.dumps({"stamp": stamp, "sha256": digest}))
    return digest


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old memo or the new one, never half of one; a failure only costs a rehash next time."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.fchmod(fd, 0o644)  # mkstemp makes it private; the cache may be shared
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
