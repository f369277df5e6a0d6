"""A NIXL agent (UCX backend) whose progress thread sleeps while idle.

NIXL's Python `nixl_agent` fixes its progress thread's delay at 0 (nixl 1.5; no config field reaches it), and
the UCX backend's thread polls its workers' event descriptors with that delay as the timeout: poll(0), a loop
that never sleeps, from ~0.6 to a whole core per agent while nothing moves (measured on CPU hosts; two
engines of a pair on one host, two cores). The thread wakes on the workers' events all the same, so the delay
only bounds how long a transport without events waits for the target's progress; a read's initiator moves
its own transfer in check_xfer_state. PROGRESS_DELAY_US = 1 ms: ~0.02 core idle.
"""

from __future__ import annotations

import threading

PROGRESS_DELAY_US = 1000

_lock = threading.Lock()  # one agent built at a time while the binding module is swapped (below)


class _DelayedBinding:
    """NIXL's binding module as nixl_agent sees it, but for the agent constructor, given PROGRESS_DELAY_US."""

    def __init__(self, binding):
        self._binding = binding

    def __getattr__(self, name):
        return getattr(self._binding, name)

    def nixlAgent(self, name, config):  # noqa: N802  (the binding's name)
        config.pthrDelay = PROGRESS_DELAY_US
        return self._binding.nixlAgent(name, config)


def make_agent(api, name: str, backends: list[str]):
    """api.nixl_agent(name) with these backends, its progress thread waiting PROGRESS_DELAY_US when idle.
    api: the NIXL Python API module (nixl_connector.nixl_api()); a version without the module-level binding
    this relies on builds the agent as it comes."""
    config = api.nixl_agent_config(backends=backends)
    binding = getattr(api, "nixlBind", None)
    if binding is None or not hasattr(binding, "nixlAgent"):
        return api.nixl_agent(name, config)
    with _lock:
        api.nixlBind = _DelayedBinding(binding)
        try:
            return api.nixl_agent(name, config)
        finally:
            api.nixlBind = binding
