"""ConfigSnapshot: a transformers config's fields for spawned ranks, unpickled without transformers."""

from __future__ import annotations

import pickle
import pickletools

import pytest
import torch

from meshserve.models.checkpoint_files import load_hf_config
from meshserve.models.config_snapshot import ConfigSnapshot, without_transformers
from tests.conftest import FAMILIES


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_snapshot_reads_every_field_as_the_config_does(family, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MESHSERVE_HF_CONFIG", "transformers")  # snapshots are of transformers' configs
    config = load_hf_config(tiny_model_dir(family))
    snap = pickle.loads(pickle.dumps(ConfigSnapshot(config)))
    names = {n for n in dir(config) if not n.startswith("__")} | set(config.attribute_map)
    read = 0
    for name in names:
        try:
            value = getattr(config, name)
        except Exception:  # noqa: BLE001
            continue
        if callable(value) or type(value).__module__.startswith("transformers"):
            continue
        assert getattr(snap, name) == value, name
        read += 1
    assert read > 40 and snap.model_type == config.model_type
    for alias in config.attribute_map:  # e.g. Mixtral's num_experts -> num_local_experts
        assert getattr(snap, alias) == getattr(config, alias)
    assert snap.to_dict() == config.to_dict()
    assert snap.to_json_string(use_diff=False) == config.to_json_string(use_diff=False)
    with pytest.raises(AttributeError):
        _ = snap.no_such_field


def _modules_named(data: bytes) -> set[str]:
    """The modules unpickling data imports: those of its GLOBAL / STACK_GLOBAL opcodes (the latter takes the
    two strings memoized or pushed just before it)."""
    modules, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            modules.add(arg.split(" ")[0])
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            modules.add(strings[-2])
    return modules


def test_a_rank_unpickles_the_engine_config_without_transformers(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MESHSERVE_HF_CONFIG", "transformers")  # else the config is a PlainHFConfig already
    from meshserve.config import EngineArgs
    from meshserve.engine.engine_config import create_engine_config

    config, source = create_engine_config(EngineArgs(model=tiny_model_dir("qwen3_moe")))
    assert any(m.startswith("transformers") for m in _modules_named(pickle.dumps((config, source))))
    sent = (without_transformers(config), without_transformers(source))
    data = pickle.dumps(sent)
    assert not any(m.startswith("transformers") for m in _modules_named(data)), _modules_named(data)
    assert type(config.model_config.hf_config).__name__ == "Qwen3MoeConfig"  # the driver's own is untouched
    config2, source2 = pickle.loads(data)
    assert (config2.model_config.num_kv_heads, config2.model_config.hf_config.num_experts,
            source2.hf_config.moe_intermediate_size) == (2, 8, 48)


@pytest.mark.parametrize("family", ["llama31", "deepseek_v2", "deepseek_v3"])  # llama3 and YaRN scaling
def test_scaled_rope_from_a_snapshot_equals_the_configs(family, tiny_model_dir, monkeypatch):
    from meshserve.layers.rotary import compute_inv_freq

    monkeypatch.setenv("MESHSERVE_HF_CONFIG", "transformers")
    config = load_hf_config(tiny_model_dir(family))
    head_dim = getattr(config, "qk_rope_head_dim", None) or config.hidden_size // config.num_attention_heads
    want, want_scale = compute_inv_freq(config, head_dim)
    got, scale = compute_inv_freq(pickle.loads(pickle.dumps(ConfigSnapshot(config))), head_dim)
    assert torch.equal(got, want) and scale == want_scale
