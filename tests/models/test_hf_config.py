"""PlainHFConfig (models/hf_config.py): the configs transformers builds, field for field, without transformers."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from meshserve.models.hf_config import (
    NeedsTransformers,
    PlainHFConfig,
    config_for_model,
    config_from_folder,
    plain_hf_config,
)
from meshserve.models.hf_config_families import FAMILIES as CONFIG_FAMILIES
from meshserve.models.presets import PRESETS
from meshserve.models.registry import _MODEL_TYPES
from tests.conftest import FAMILIES, VOCAB
from tests.models.test_config_snapshot import _modules_named

# transformers' tensor / pipeline / expert / FSDP sharding plans: class constants meshserve never reads
_NOT_KEPT = {"base_model_tp_plan", "base_model_pp_plan", "base_model_ep_plan", "base_model_fsdp_plan"}
_TINY = {"vocab_size": VOCAB, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "initializer_range": 0.2, "bos_token_id": 0, "eos_token_id": 2}

CASES: dict[str, dict] = {
    **{f"preset-{name}": fields for name, fields in PRESETS.items()},
    **{f"tiny-{name}": {**_TINY, **fields} for name, fields in FAMILIES.items()},
    # every class's own defaults
    **{f"bare-{model_type}": {"model_type": model_type} for model_type in CONFIG_FAMILIES},
    # legacy and odd spellings a config.json may hold
    "llama-rope-theta-only": {"model_type": "llama", "rope_theta": 500000.0, "torch_dtype": "float16"},
    "llama-linear-rope": {"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0},
                          "rope_theta": 10000, "dtype": "float32"},
    "llama-rope-parameters": {"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                                                                         "low_freq_factor": 1.0,
                                                                         "high_freq_factor": 4.0,
                                                                         "rope_theta": 500000.0}},
    "llama-extras": {"model_type": "llama", "temperature": 0.6, "top_p": 0.9, "max_length": 4096,
                     "custom_field": [1, 2], "_name_or_path": "somewhere", "transformers_version": "4.45.0",
                     "id2label": {"0": "A", "1": "B", "2": "C"}, "num_labels": 3, "pad_token_id": 0,
                     "head_dim": 64, "attention_bias": True, "mlp_bias": True, "use_cache": False},
    "llama-num-labels": {"model_type": "llama", "num_labels": 5},
    "qwen2-sliding": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 1024,
                      "max_window_layers": 4, "num_hidden_layers": 8},
    "qwen2-moe-sliding": {"model_type": "qwen2_moe", "use_sliding_window": True, "num_hidden_layers": 6,
                          "max_window_layers": 3},
    "qwen3-layer-types": {"model_type": "qwen3", "num_hidden_layers": 2,
                          "layer_types": ["full_attention", "sliding_attention"]},
    "mixtral-num-experts": {"model_type": "mixtral", "num_experts": 4, "rope_theta": 1e6},
    "mistral-no-head-dim": {"model_type": "mistral", "head_dim": None, "sliding_window": 2048},
    "deepseek-v2-no-kv-heads": {"model_type": "deepseek_v2", "num_key_value_heads": None, "num_experts": 16,
                                "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 8}},
    "deepseek-v3-mtp": {"model_type": "deepseek_v3", "num_mtp_layers": 2, "partial_rotary_factor": 1.0},
    "deepseek-v3-nextn": {"model_type": "deepseek_v3", "num_nextn_predict_layers": 3, "max_position_embeddings": 4,
                          "rope_scaling": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 2,
                                           "truncate": False}},
}


def _readable(config) -> dict:
    """Every attribute of a config that reads without error, methods and transformers objects aside."""
    names = {n for n in dir(config) if not n.startswith("__")} | set(config.attribute_map)
    out = {}
    for name in sorted(names - _NOT_KEPT):
        try:
            value = getattr(config, name)
        except Exception:  # noqa: BLE001  (a property that does not apply, as in transformers)
            continue
        if not callable(value) and not type(value).__module__.startswith("transformers"):
            out[name] = value
    return out


def _assert_same(plain, hf) -> None:
    assert isinstance(plain, PlainHFConfig)
    assert type(plain).__name__ == type(hf).__name__  # loader.checkpoint_shapes keys its disk cache by it
    assert plain.to_dict() == hf.to_dict()
    assert plain.to_json_string(use_diff=False) == hf.to_json_string(use_diff=False)
    want = _readable(hf)
    got = {name: getattr(plain, name) for name in want}
    for name, value in want.items():
        assert got[name] == value and type(got[name]) is type(value), (name, got[name], value)
    assert len(want) > 50
    with pytest.raises(AttributeError):
        _ = plain.no_such_field


def test_every_served_model_type_is_built_without_transformers():
    assert set(_MODEL_TYPES) <= set(CONFIG_FAMILIES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_equals_transformers(case):
    from transformers import AutoConfig

    fields = copy.deepcopy(CASES[case])
    model_type = fields.pop("model_type")
    before = copy.deepcopy(fields)
    plain = plain_hf_config(model_type, fields)
    assert fields == before  # the caller's dicts are left as they were
    _assert_same(plain, AutoConfig.for_model(model_type, **fields))
    # a rank unpickles it without transformers, every field intact
    back = pickle.loads(pickle.dumps(plain))
    assert type(back) is type(plain) and back.to_dict() == plain.to_dict() and _readable(back) == _readable(plain)
    assert not any(m.startswith("transformers") for m in _modules_named(pickle.dumps(plain)))


OVERRIDES = [("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0}, "max_position_embeddings": 4096}),
             ("llama", {"rope_scaling": {"type": "linear", "factor": 4.0}, "torch_dtype": "float16",
                        "num_labels": 3, "name_or_path": "x", "new_field": 7}),
             ("mixtral", {"num_experts": 2, "num_hidden_layers": 3, "output_attentions": True}),
             ("deepseek_v3", {"num_mtp_layers": 0, "num_local_experts": 16, "rope_scaling": None})]


@pytest.mark.parametrize("model_type,overrides", OVERRIDES)
def test_fields_set_afterwards_as_in_transformers(model_type, overrides):
    """--hf-overrides sets fields on the built config (engine_config.py): aliases and properties apply."""
    import warnings

    from transformers import AutoConfig

    plain, hf = plain_hf_config(model_type, {}), AutoConfig.for_model(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rope_scaling's deprecation
        for key, value in overrides.items():
            setattr(plain, key, copy.deepcopy(value))
            setattr(hf, key, copy.deepcopy(value))
    _assert_same(plain, hf)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_folder_config_equals_from_pretrained(family, tiny_model_dir):
    from transformers import AutoConfig

    path = tiny_model_dir(family)
    _assert_same(config_from_folder(path), AutoConfig.from_pretrained(path, local_files_only=True))


# config.json files as published (Llama-3.1-8B-Instruct, Qwen3-8B; DeepSeek-V3's remote-code map)
PUBLISHED = {
    "llama-3.1-8b-instruct": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256},
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
        "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
    "deepseek-v3-remote-code-map": {
        **{k: v for k, v in PRESETS["deepseek-v3"].items()},
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_json_equals_from_pretrained(name, tmp_path):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    _assert_same(config_from_folder(str(tmp_path)), AutoConfig.from_pretrained(str(tmp_path), local_files_only=True))


def test_folder_config_with_special_floats_and_a_name(tmp_path):
    from transformers import AutoConfig

    fields = {"model_type": "qwen3", "num_hidden_layers": 2, "_name_or_path": "elsewhere",
              "router_limit": {"__float__": "Infinity"}, "architectures": ["Qwen3ForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    plain = config_from_folder(str(tmp_path))
    assert plain.router_limit == float("inf")
    _assert_same(plain, AutoConfig.from_pretrained(str(tmp_path), local_files_only=True))


def test_what_it_does_not_reproduce_is_transformers_own(tmp_path, monkeypatch):
    with pytest.raises(NeedsTransformers):
        plain_hf_config("gpt2", {})
    assert type(config_for_model("gpt2", {"n_layer": 2})).__module__.startswith("transformers")
    nested = {"model_type": "qwen3", "num_hidden_layers": 2, "layer_types": ["full_attention"] * 2,
              "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}}
    (tmp_path / "config.json").write_text(json.dumps(nested))
    assert type(config_from_folder(str(tmp_path))).__module__.startswith("transformers")
    mistral = {"model_type": "mistral", "layer_types": ["full_attention"] * 32}  # AutoConfig: ministral
    (tmp_path / "config.json").write_text(json.dumps(mistral))
    assert type(config_from_folder(str(tmp_path))).__name__ == "MinistralConfig"
    monkeypatch.setenv("MESHSERVE_HF_CONFIG", "transformers")
    assert type(config_for_model("llama", {})).__module__.startswith("transformers")


def test_transformers_refusal_is_kept():
    from transformers import AutoConfig

    for model_type in ("llama", "deepseek_v2"):
        with pytest.raises(Exception, match="not a multiple"):  # huggingface_hub's StrictDataclass...Error
            AutoConfig.for_model(model_type, hidden_size=100, num_attention_heads=3)
        with pytest.raises(ValueError, match="not a multiple"):
            plain_hf_config(model_type, {"hidden_size": 100, "num_attention_heads": 3})


def test_back_to_transformers_gives_the_same_config():
    from meshserve.models.config_snapshot import as_hf_config

    plain = plain_hf_config("deepseek_v3", copy.deepcopy({k: v for k, v in PRESETS["deepseek-v3"].items()
                                                          if k != "model_type"}))
    hf = as_hf_config(plain)
    assert type(hf).__module__.startswith("transformers") and hf.to_dict() == plain.to_dict()


# RoPE: ours against transformers' ROPE_INIT_FUNCTIONS on transformers' own config
ROPE_CASES = ["preset-llama-3.1-8b", "preset-deepseek-v2-lite", "preset-deepseek-v3", "tiny-llama31",
              "tiny-deepseek_v2", "tiny-deepseek_v3", "llama-linear-rope", "llama-rope-parameters",
              "deepseek-v2-no-kv-heads", "deepseek-v3-nextn"]


@pytest.mark.parametrize("case", ROPE_CASES)
def test_scaled_rope_equals_transformers(case):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from meshserve.layers.rotary import compute_inv_freq

    fields = copy.deepcopy(CASES[case])
    model_type = fields.pop("model_type")
    hf = AutoConfig.for_model(model_type, **copy.deepcopy(fields))
    plain = plain_hf_config(model_type, fields)
    rope_type = hf.rope_parameters["rope_type"]
    assert rope_type in ("llama3", "yarn", "linear")
    want, want_scale = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    head_dim = getattr(hf, "qk_rope_head_dim", None) or hf.head_dim
    for config in (plain, hf):
        got, scale = compute_inv_freq(config, head_dim)
        assert got.dtype == torch.float32 and torch.equal(got, want.float()), case
        assert scale == float(want_scale)
    if case == "tiny-deepseek_v3":  # mscale != mscale_all_dim: the cos/sin scale is not 1
        assert want_scale != 1.0


_CORE_RUN = """
import json, sys
from meshserve.config import EngineArgs
from meshserve.engine.core import EngineCore
from meshserve.engine.messages import EngineCoreRequest
from meshserve.sampling import SamplingParams

runs = []
for model, load_format in zip(sys.argv[1::2], sys.argv[2::2]):  # one core after the other, in this order
    core = EngineCore.from_engine_args(EngineArgs(model=model, load_format=load_format, max_model_len=128))
    core.add_request(EngineCoreRequest("r", [1, 2, 3, 4, 5], SamplingParams(temperature=0.0, max_tokens=6), 6))
    tokens = []
    while len(tokens) < 6:
        tokens += [t for o in core.step().outputs for t in o.new_token_ids]
    runs.append({"tokens": tokens, "eos": core.info.eos_token_ids,
                 "config_module": type(core.config.model_config.hf_config).__module__,
                 "transformers": sorted(m for m in sys.modules if m.startswith("transformers"))})
    core.shutdown()
print(json.dumps(runs))
"""


def _core_runs(models: list[tuple[str, str]], env: dict) -> list[dict]:
    """Each (model, load format) built and run by an engine core, one after the other in one process (a
    process per model cost a second or more of imports each); a run's `transformers` lists what that process
    had imported of transformers once that model's core ran, `config_module` where its config's class is from."""
    args = [a for pair in models for a in pair]
    out = subprocess.run([sys.executable, "-c", _CORE_RUN, *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd(), **env}, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["llama31", "deepseek_v3"])
def test_engine_core_starts_and_generates_without_transformers(family, tiny_model_dir, tmp_path, monkeypatch):
    """A model folder (real weights) and a config.json on dummy weights (a dense family's checkpoint shapes
    from its config, on an empty cache; an MLA family's from the disk cache, as after any earlier start): the
    core builds, generates and never imports transformers; the tokens and EOS ids are those of the
    transformers-config path."""
    from meshserve.models.dense_shapes import dense_checkpoint_shapes
    from meshserve.models.loader import checkpoint_shapes

    fields = {**_TINY, **FAMILIES[family]}
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(fields))
    env = {"MESHSERVE_CACHE_DIR": str(tmp_path / "cache")}
    monkeypatch.setenv("MESHSERVE_CACHE_DIR", env["MESHSERVE_CACHE_DIR"])
    model_type = fields.pop("model_type")
    config = config_for_model(model_type, fields)
    if dense_checkpoint_shapes(config) is None:
        checkpoint_shapes(config)  # fills the disk cache (transformers is loaded in this process)
    # the folder without its tokenizer: with one, the grammar compiler's worker thread loads it (transformers'
    # AutoTokenizer, for xgrammar) once the core is built, off the start's path (structured/compiler.py)
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_model_dir(family), name), folder / name)
    models = [(str(folder), "auto"), (str(config_json), "dummy")]
    plain_runs = _core_runs(models, env)
    hf_runs = _core_runs(models, {**env, "MESHSERVE_HF_CONFIG": "transformers"})
    for (model, _), plain, hf in zip(models, plain_runs, hf_runs, strict=True):
        assert plain["transformers"] == [], (model, plain["transformers"][:5])
        # each model's config came from transformers on that path (the second run finds it imported already)
        assert hf["config_module"].startswith("transformers."), (model, hf["config_module"])
        assert not plain["config_module"].startswith("transformers"), (model, plain["config_module"])
        assert hf["transformers"] and (plain["tokens"], plain["eos"]) == (hf["tokens"], hf["eos"])
