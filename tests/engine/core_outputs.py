"""Reading an engine core client's outputs in tests (one core or data-parallel cores alike)."""

from __future__ import annotations

import time

from meshserve.engine.core_client import EngineCoreClient
from meshserve.engine.messages import EngineCoreOutputs


def collect_outputs(client: EngineCoreClient, until, timeout: float = 60.0) -> list[EngineCoreOutputs]:
    """Outputs until until(outputs so far) holds; fails once the client has given none for timeout seconds."""
    got: list[EngineCoreOutputs] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        assert time.monotonic() < deadline, "the engine core stopped answering"
        out = client.get_outputs(timeout=1.0)
        if out is not None:
            got.append(out)
    return got


def finished_ids(got: list[EngineCoreOutputs]) -> set[str]:
    return {o.request_id for m in got for o in m.outputs if o.finished}
