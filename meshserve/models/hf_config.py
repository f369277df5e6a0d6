"""Model configs read from config.json fields without importing transformers, equal to transformers' own.

Importing transformers' config module for a model type pulls in half of transformers (activations, hub
kernels, core_model_loading -> torch.distributed.tensor, sympy): ~10 s of the engine core's start on the
device, though the engine only reads the config's fields. For the model types meshserve serves
(hf_config_families.py), PlainHFConfig applies what transformers' classes do to the same fields (defaults,
aliases, each family's derivations, the base class's dtype / labels / RoPE standardisation) and serialises
the same `to_dict` / `to_json_string(use_diff=False)`. Other model types, configs using features this
module does not reproduce, or MESHSERVE_HF_CONFIG=transformers, get transformers' AutoConfig as before.
tests/models/test_hf_config.py holds both to equality field by field.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
from functools import cache

from meshserve.models.hf_config_families import BASE_FIELDS, FAMILIES, GENERATION_PARAMETERS, ConfigFamily

_SWITCH = "MESHSERVE_HF_CONFIG"  # "transformers": always transformers' AutoConfig
_FLOAT_TAG = "__float__"  # transformers' JSON encoding of inf / nan
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# keys of the instance dict that transformers' to_dict leaves out
_NOT_SERIALIZED = ("_post_init_done", "_attn_implementation_internal", "_experts_implementation_internal",
                   "ignore_keys_at_rope_validation")
_PLAIN_LAYER_TYPES = {"full_attention", "sliding_attention"}  # names remap_legacy_layer_types keeps as they are


class NeedsTransformers(Exception):
    """The config uses something PlainHFConfig does not reproduce: build it with transformers."""


@cache
def transformers_version() -> str | None:
    """The installed transformers' version, read from its package metadata (no import)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


class PlainHFConfig:
    """A transformers config's fields as plain attributes (its attribute_map aliases, `rope_scaling`,
    `torch_dtype`, `num_labels` ... included), built without transformers. Pickles without it too."""

    _config_family: ConfigFamily  # set per model type on the subclasses below

    @property
    def model_type(self) -> str:
        return self._config_family.model_type

    @property
    def attribute_map(self) -> dict:
        return dict(self._config_family.attribute_map)

    @property
    def default_theta(self) -> float:
        return self._config_family.default_theta

    default_rope_type = "default"
    base_config_key = ""
    is_heterogeneous = False
    per_layer_attributes = None
    allow_global_per_layer_attribute_access = False
    serialize_explicit_per_layer_config = False
    sub_configs: dict = {}
    sub_configs_defaults: dict = {}
    extra_files: tuple = ()
    extra_config_files: tuple = ()
    _auto_class = None
    ignore_keys_at_rope_validation: set = set()

    def __setattr__(self, key, value):
        super().__setattr__(self._config_family.attribute_map.get(key, key), value)

    def __getattr__(self, key):  # only when normal lookup fails: the aliases
        alias = type(self)._config_family.attribute_map.get(key)
        if alias is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{key}'")
        return getattr(self, alias)

    # the properties transformers' configs have, setters included (--hf-overrides sets fields after the build)
    @property
    def rope_scaling(self):
        return self.rope_parameters

    @rope_scaling.setter
    def rope_scaling(self, value):
        self.rope_parameters = value
        if value is not None and self.__dict__.get("_post_init_done", False):
            _standardize_rope_params(self)

    @property
    def torch_dtype(self):
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value):
        self.dtype = value

    @property
    def use_return_dict(self):
        return self.return_dict

    @property
    def name_or_path(self) -> str | None:
        return self.__dict__.get("_name_or_path")

    @name_or_path.setter
    def name_or_path(self, value):
        self._name_or_path = str(value)

    @property
    def num_labels(self) -> int | None:
        return len(self.id2label) if self.id2label is not None else None

    @num_labels.setter
    def num_labels(self, num_labels: int):
        if self.id2label is None or self.num_labels != num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
            self.label2id = dict(zip(self.id2label.values(), self.id2label.keys(), strict=True))

    @property
    def output_attentions(self):
        return self._output_attentions

    @output_attentions.setter
    def output_attentions(self, value: bool):
        if value and self._attn_implementation_internal is None:
            self._attn_implementation_internal = "eager"
        if value and self._attn_implementation_internal != "eager":
            raise ValueError("The `output_attentions` attribute is not supported when using the "
                             f"`attn_implementation` set to {self._attn_implementation_internal}. "
                             "Please set it to 'eager' instead.")
        self._output_attentions = value

    @property
    def _attn_implementation(self):
        return self._attn_implementation_internal

    @property
    def _experts_implementation(self):
        return self._experts_implementation_internal

    def get_text_config(self, decoder=None, encoder=None):
        return self

    def to_dict(self) -> dict:
        """What transformers' to_dict gives for the same config."""
        out = copy.deepcopy(self.__dict__)
        out["model_type"] = self.model_type
        out["transformers_version"] = transformers_version()
        for key in _NOT_SERIALIZED:
            out.pop(key, None)
        out["output_attentions"] = out.pop("_output_attentions")
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = _tuples_to_lists(value)
        _dtype_to_str(out)
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        if use_diff:  # the diff against the class's defaults: transformers' own code says it best
            return as_transformers_config(self).to_json_string()
        return json.dumps(_encode_special_floats(self.to_dict()), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string(use_diff=False)}"


def _tuples_to_lists(value):
    return [_tuples_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _dtype_to_str(d: dict) -> None:
    if d.get("dtype") is not None and not isinstance(d["dtype"], (str, int, dict)):
        d["dtype"] = str(d["dtype"]).split(".")[1]
    for value in d.values():
        if isinstance(value, dict):
            _dtype_to_str(value)


def _encode_special_floats(obj):
    if isinstance(obj, float):
        for tag, special in _SPECIAL_FLOATS.items():
            if obj == special or (math.isnan(obj) and math.isnan(special)):
                return {_FLOAT_TAG: tag}
        return obj
    if isinstance(obj, dict):
        return {k: _encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_special_floats(v) for v in obj]
    return obj


def _decode_special_floats(obj):
    if isinstance(obj, dict):
        if set(obj) == {_FLOAT_TAG} and obj[_FLOAT_TAG] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[obj[_FLOAT_TAG]]
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(v) for v in obj]
    return obj


# one class per family, named as transformers names it (loader.checkpoint_shapes keys its cache by that name)
for _family in FAMILIES.values():
    globals()[_family.class_name] = type(_family.class_name, (PlainHFConfig,),
                                         {"_config_family": _family, "__module__": __name__,
                                          "__doc__": f"{_family.class_name}'s fields, without transformers."})
del _family


def _per_layer_type(c, params: dict) -> bool:
    return any(key in (getattr(c, "layer_types", None) or ()) for key in params)


def _standardize_rope_params(c) -> None:
    """RotaryEmbeddingConfigMixin.standardize_rope_params, flat parameters: at the build and after
    rope_scaling is set."""
    rope_theta = c.__dict__.get("rope_theta")
    partial_rotary_factor = c.__dict__.get("partial_rotary_factor")
    params = c.rope_parameters or {}
    if _per_layer_type(c, params):
        raise ValueError("RoPE parameters per layer type need transformers' config "
                         "(MESHSERVE_HF_CONFIG=transformers)")
    if not (params or rope_theta):
        return
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", rope_theta)
    if partial_rotary_factor is not None:
        params.setdefault("partial_rotary_factor", partial_rotary_factor)
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in c.__dict__:  # Phi-3's spelling: the field outside wins
            params["original_max_position_embeddings"] = c.original_max_position_embeddings
        else:
            params.setdefault("original_max_position_embeddings", c.max_position_embeddings)
    c.rope_parameters = params


def _convert_rope_params(c, kwargs: dict) -> None:
    """RotaryEmbeddingConfigMixin.convert_rope_params_to_dict: config.json's rope_scaling / rope_theta /
    partial_rotary_factor into rope_parameters, then standardised."""
    params = kwargs.pop("rope_scaling", None) or c.rope_parameters
    params = params if params is not None else {}
    if _per_layer_type(c, params):
        raise NeedsTransformers("RoPE parameters per layer type")
    params.setdefault("rope_theta", kwargs.pop("rope_theta", c._config_family.default_theta))
    partial_rotary_factor = kwargs.pop("partial_rotary_factor", None)
    if partial_rotary_factor is not None:
        params.setdefault("partial_rotary_factor", partial_rotary_factor)
        c.ignore_keys_at_rope_validation = {"partial_rotary_factor"}
    c.rope_parameters = params
    _standardize_rope_params(c)


def _base_post_init(c, kwargs: dict) -> None:
    """PreTrainedConfig.__post_init__ for a config without sub-configs or per-layer configs."""
    if "per_layer_config" in kwargs:
        raise NeedsTransformers("per_layer_config")
    if (torch_dtype := kwargs.pop("torch_dtype", None)) is not None:
        c.dtype = c.dtype if c.dtype is not None else torch_dtype
    if c.dtype is not None and isinstance(c.dtype, str):
        import torch  # the engine has it loaded already; transformers converts the name to the dtype too

        c.dtype = getattr(torch, c.dtype)
    if c.id2label is None:
        c.num_labels = kwargs.get("num_labels", 2)
    else:
        c.id2label = {int(key): value for key, value in c.id2label.items()}
    if c.problem_type == "single_label_classification" and c.num_labels == 1:
        raise NeedsTransformers("problem_type single_label_classification with one label")  # an error there
    _convert_rope_params(c, kwargs)
    for name in GENERATION_PARAMETERS:
        kwargs.pop(name, None)
    c._name_or_path = str(kwargs.pop("name_or_path", ""))
    kwargs.pop("_commit_hash", None)
    c._output_attentions = kwargs.pop("output_attentions", False)
    c._attn_implementation_internal = kwargs.pop("attn_implementation", None)
    c._experts_implementation_internal = kwargs.pop("experts_implementation", None)
    if c._output_attentions:
        raise NeedsTransformers("output_attentions")  # transformers' validation weighs it against attention
    for key, value in kwargs.items():
        if key not in ("_attn_implementation_internal", "_experts_implementation_internal"):
            setattr(c, key, value)  # properties (num_labels, name_or_path ...) through their setters
    for key in ("layer_types", "mtp_layer_types"):
        layers = getattr(c, key, None)
        if layers is not None and not set(layers) <= _PLAIN_LAYER_TYPES:
            raise NeedsTransformers(f"{key} {sorted(set(layers))}")
    c._post_init_done = True


def plain_hf_config(model_type: str, fields: dict) -> PlainHFConfig:
    """The config transformers' `AutoConfig.for_model(model_type, **fields)` builds, without transformers.
    NeedsTransformers when model_type or one of the fields is outside what this module reproduces;
    ValueError where transformers' validation refuses the fields."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise NeedsTransformers(f"model type {model_type!r}")
    # auto_map (remote code) stays a plain field: meshserve never trusts remote code, so AutoConfig takes
    # transformers' own class for these model types and keeps auto_map as an attribute
    if any(isinstance(v, dict) and "model_type" in v for v in fields.values()):
        raise NeedsTransformers("a nested config")
    kwargs = copy.deepcopy(fields)  # transformers edits the RoPE dict it is given: the caller's stays as it was
    config = object.__new__(globals()[family.class_name])
    try:
        for name, default in {**BASE_FIELDS, **family.fields}.items():  # the dataclass __init__ (aliases apply)
            setattr(config, name, kwargs.pop(name) if name in kwargs else default)
        family.post_init(config, kwargs)
        _base_post_init(config, kwargs)
    except AttributeError as e:  # a field named like one of our read-only properties
        raise NeedsTransformers(str(e)) from e
    if family.heads_divide_hidden and config.hidden_size % config.num_attention_heads != 0:
        raise ValueError(f"The hidden size ({config.hidden_size}) is not a multiple of the number of attention "
                         f"heads ({config.num_attention_heads}).")
    return config


def use_transformers() -> bool:
    return os.environ.get(_SWITCH, "").lower() == "transformers"


def config_for_model(model_type: str, fields: dict):
    """`AutoConfig.for_model(model_type, **fields)`: a PlainHFConfig where it can be, else transformers'."""
    if not use_transformers():
        try:
            return plain_hf_config(model_type, fields)
        except NeedsTransformers:
            pass
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **fields)


def config_from_folder(path: str):
    """`AutoConfig.from_pretrained(path, local_files_only=True)` for a folder's config.json: a PlainHFConfig
    where it can be, else transformers'. Errors are transformers' own (ValueError, OSError, ...)."""
    if not use_transformers():
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                fields = _decode_special_floats(json.load(f))
            # AutoConfig reads a mistral config.json with layer_types as ministral
            if (isinstance(fields, dict) and isinstance(fields.get("model_type"), str)
                    and not (fields["model_type"] == "mistral" and "layer_types" in fields)):
                config = plain_hf_config(fields.pop("model_type"), {**fields, "name_or_path": path})
                config._name_or_path = str(path)  # from_dict sets it again after config.json's own
                return config
        except (NeedsTransformers, OSError, ValueError, TypeError, AttributeError, KeyError):
            pass  # transformers reads it again and says what is wrong with it
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def as_transformers_config(config):
    """config itself, or transformers' config equal to a PlainHFConfig (imports transformers), for code that
    hands the config to transformers (its model classes, its RoPE helpers)."""
    if not isinstance(config, PlainHFConfig):
        return config
    from transformers import AutoConfig

    fields = config.to_dict()
    fields.pop("transformers_version", None)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
