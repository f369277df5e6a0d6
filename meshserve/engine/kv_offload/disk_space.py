"""Whether the disk tier's folder can take the bytes asked of it: checked at start, so a tier larger than its file
system is one error line naming the flag, not a disk filled to the last byte mid-run (the tier's writes would then
fail, and so would everything else writing to that file system: logs, other programs).

Rule: the bytes the tier may still add (its bound, less what its own block files from a previous run hold already)
must fit the file system's free space less a margin: MARGIN_BYTES (1 GiB), or MARGIN_FRACTION (5 %) of the file
system's size when that is smaller. Other models' block folders under the same path are not counted as room: this
engine never deletes them (another engine may use them); the error names what they hold.

No torch or numpy here: the command line's checks import it before anything loads."""

from __future__ import annotations

import os
import shutil

from meshserve.errors import InvalidArgumentError

GiB = 1 << 30
MARGIN_BYTES = GiB
MARGIN_FRACTION = 0.05
FLAG = "--kv-offloading-disk-path"
PARAM = "kv_offloading_disk_path"
SUFFIX = ".kv"  # disk_tier.py's block files


def margin_bytes(total: int) -> int:
    """Free space the disk tier leaves on a file system of total bytes."""
    return min(MARGIN_BYTES, int(total * MARGIN_FRACTION))


def folder_bytes(folder: str) -> int:
    """Bytes of the block files directly in folder (0 when it is missing)."""
    n = 0
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(SUFFIX):
                    try:
                        n += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        pass
    except OSError:
        pass
    return n


def block_folders_bytes(root: str, skip: str | None = None) -> int:
    """Bytes of the block files in root's per-model folders (each named by a 32-hex-digit fingerprint), but skip."""
    n = 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        if len(name) == 32 and all(c in "0123456789abcdef" for c in name) and name != skip:
            n += folder_bytes(os.path.join(root, name))
    return n


def _existing(path: str) -> str:
    """path, or its nearest existing parent (the folder will be made under it)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def check_disk_room(path: str, size_gib: float, kept_bytes: int, other_bytes: int = 0) -> None:
    """Refuse a disk tier of size_gib under path whose growth past kept_bytes (its own files, there already)
    does not fit the file system's free space less the margin. other_bytes: what other models' block folders
    under path hold (named in the error: deleting them makes room)."""
    probe = _existing(path)
    try:
        usage = shutil.disk_usage(probe)
    except OSError as e:  # (no answer from the file system: nothing to say about its room)
        raise InvalidArgumentError(f"{FLAG} {path}: cannot read the free space of {probe} ({e.strerror or e})",
                                   param=PARAM) from None
    asked = int(size_gib * GiB)
    margin = margin_bytes(usage.total)
    room = usage.free + kept_bytes - margin
    if asked <= room:
        return
    others = (f"; other models' block folders under {path} hold {other_bytes / GiB:.2f} GiB of it"
              if other_bytes else "")
    kept = f" (+ {kept_bytes / GiB:.2f} GiB of this tier's files already there)" if kept_bytes else ""
    raise InvalidArgumentError(
        f"--kv-offloading-disk-size {size_gib:g} GiB does not fit {FLAG} {path}: its file system has "
        f"{usage.free / GiB:.2f} GiB free{kept}, and {margin / GiB:.2f} GiB is kept free{others}; lower "
        f"--kv-offloading-disk-size to at most {max(room, 0) / GiB:.2f} GiB", param="kv_offloading_disk_size")


def check_disk_tier_args(path: str | None, size_gib: float | None) -> None:
    """The command line's check, before the model loads: the path is a folder (or can be made as one: it is made
    at start) that this process can write in, and the size fits its free space. The tier's own files are not
    known yet (their folder is named by the model's fingerprint), so every block folder's files under path
    count as room here; the disk tier checks again exactly when it opens (disk_tier.py)."""
    if not path or not size_gib or size_gib <= 0:
        return  # EngineArgs.validate says what is missing
    probe = _existing(path)
    if not os.path.isdir(probe):
        raise InvalidArgumentError(f"{FLAG} {path}: {probe} is a file, not a folder", param=PARAM)
    check_disk_room(path, size_gib, block_folders_bytes(path) if os.path.isdir(path) else 0)
