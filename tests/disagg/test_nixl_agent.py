"""make_agent over a stand-in of NIXL's Python API (no library needed): the agent's config carries the
progress delay, the API's binding module is put back (also when the agent fails to start), and an API
without that binding builds its agent as it comes. The real agents' idle CPU: test_nixl_connector.py."""

from __future__ import annotations

import types

import pytest

from meshserve.disagg.nixl_agent import PROGRESS_DELAY_US, make_agent


def _api(fail: bool = False):
    """NIXL's _api shape: nixl_agent reads the module-level nixlBind, sets pthrDelay = 0, builds the agent."""
    built = []

    class Config:
        pthrDelay = None

    def native_agent(name, config):
        if fail:
            raise RuntimeError("no UCX")
        built.append((name, config.pthrDelay))
        return name

    binding = types.SimpleNamespace(nixlAgent=native_agent, nixlAgentConfig=Config)
    api = types.SimpleNamespace(nixlBind=binding, built=built)

    def nixl_agent(name, conf):
        config = api.nixlBind.nixlAgentConfig()
        config.pthrDelay = 0  # (what NIXL's Python API fixes)
        return types.SimpleNamespace(agent=api.nixlBind.nixlAgent(name, config), conf=conf)

    api.nixl_agent = nixl_agent
    api.nixl_agent_config = lambda backends: {"backends": backends}
    return api, binding


def test_the_agent_gets_the_progress_delay_and_the_binding_is_put_back():
    api, binding = _api()
    agent = make_agent(api, "a", ["UCX"])
    assert api.built == [("a", PROGRESS_DELAY_US)] and agent.conf == {"backends": ["UCX"]}
    assert api.nixlBind is binding

    failing, binding = _api(fail=True)
    with pytest.raises(RuntimeError, match="no UCX"):
        make_agent(failing, "b", ["UCX"])
    assert failing.nixlBind is binding


def test_an_api_without_the_binding_builds_its_agent_as_it_comes():
    api, _ = _api()
    plain = types.SimpleNamespace(
        nixl_agent=lambda name, conf: (name, conf), nixl_agent_config=api.nixl_agent_config
    )
    assert make_agent(plain, "c", ["UCX"]) == ("c", {"backends": ["UCX"]})
