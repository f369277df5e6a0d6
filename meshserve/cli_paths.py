"""Checks of the files a command line names, run before any work starts: a report path in a missing folder
must fail in a fraction of a second with the flag's name, not as a FileNotFoundError traceback after a
simulation or a benchmark has run for minutes (its results lost)."""

from __future__ import annotations

import os
import tempfile

from meshserve.errors import InvalidArgumentError


def _param(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def check_output_file(path: str | None, flag: str) -> None:
    """path (when given) can be created or appended to: its folder exists and is writable, and it is no folder."""
    if path is None:
        return
    if not path:
        raise InvalidArgumentError(f"{flag}: the path is empty", param=_param(flag))
    if os.path.isdir(path):
        raise InvalidArgumentError(f"{flag} {path}: is a folder, not a file", param=_param(flag))
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InvalidArgumentError(f"{flag} {path}: the folder {folder} does not exist", param=_param(flag))
    existed = os.path.exists(path)
    try:  # a real open, not os.access: root passes access checks on read-only and special file systems
        with open(path, "a"):
            pass
    except OSError as e:
        raise InvalidArgumentError(f"{flag} {path}: cannot write it ({e.strerror or e})", param=_param(flag)) from None
    if not existed:
        os.remove(path)  # the probe leaves nothing behind


def check_output_folder(path: str | None, flag: str) -> None:
    """path (when given) is a writable folder, or can be made as one (its nearest existing parent is a
    writable folder)."""
    if path is None:
        return
    if not path:
        raise InvalidArgumentError(f"{flag}: the path is empty", param=_param(flag))
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InvalidArgumentError(f"{flag} {path}: {probe} is a file, not a folder", param=_param(flag))
    try:  # a real folder made and removed, not os.access: root passes access checks on read-only and special
        os.rmdir(tempfile.mkdtemp(prefix=".meshserve-probe-", dir=probe))  # file systems (/proc, a ro mount)
    except OSError as e:
        raise InvalidArgumentError(f"{flag} {path}: {probe} is not writable ({e.strerror or e})",
                                   param=_param(flag)) from None


def check_input_file(path: str | None, flag: str) -> None:
    """path (when given) is a readable file."""
    if path is None:
        return
    if not os.path.exists(path):
        raise InvalidArgumentError(f"{flag} {path}: file not found", param=_param(flag))
    if not os.path.isfile(path):
        raise InvalidArgumentError(f"{flag} {path}: not a file", param=_param(flag))
    if not os.access(path, os.R_OK):
        raise InvalidArgumentError(f"{flag} {path}: not readable", param=_param(flag))


def read_text_file(path: str, what: str, param: str) -> str:
    """The UTF-8 text of the file at path; a one-line error naming `what` (the flag, or "trace file") when it is
    missing, unreadable or binary (a UnicodeDecodeError or PermissionError traceback otherwise)."""
    if not os.path.isfile(path):
        raise InvalidArgumentError(f"{what}: file not found: {path}", param=param)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{what} {path}: not UTF-8 text ({e.reason})", param=param) from None
    except OSError as e:
        raise InvalidArgumentError(f"{what} {path}: cannot read it ({e.strerror or e})", param=param) from None
