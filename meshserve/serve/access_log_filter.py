"""--disable-access-log-for-endpoints (vLLM's): no uvicorn access-log line for these paths (probes, scrapes)."""

from __future__ import annotations

import logging


class SkipPaths(logging.Filter):
    """Drops uvicorn.access records whose path (query string aside) is one of `paths`."""

    def __init__(self, paths: tuple[str, ...]):
        super().__init__()
        self.paths = frozenset(paths)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            return args[2].split("?", 1)[0] not in self.paths
        return True


def skip_access_log(paths: tuple[str, ...]) -> None:
    """Install the filter on uvicorn's access logger (after uvicorn configured its logging)."""
    if paths:
        logging.getLogger("uvicorn.access").addFilter(SkipPaths(paths))
