"""dense_shapes: the dense families' checkpoint names and shapes from the config equal transformers' state_dict."""

from __future__ import annotations

import copy

import pytest
import torch

from meshserve.models.dense_shapes import dense_checkpoint_shapes
from meshserve.models.hf_config import plain_hf_config
from meshserve.models.presets import PRESETS
from tests.conftest import FAMILIES, VOCAB

_TINY = {"vocab_size": VOCAB, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
CASES = {
    **{f"preset-{n}": f for n, f in PRESETS.items() if f["model_type"] in ("llama", "mistral", "qwen2", "qwen3")},
    **{f"tiny-{n}": {**_TINY, **f} for n, f in FAMILIES.items()},
    "llama-biases": {**_TINY, "model_type": "llama", "attention_bias": True, "mlp_bias": True, "head_dim": 16},
    "qwen3-bias": {**_TINY, "model_type": "qwen3", "attention_bias": True, "head_dim": 32},
    "qwen2-head-dim": {**_TINY, "model_type": "qwen2", "head_dim": 32, "num_key_value_heads": 4},
    "mistral-head-dim": {**_TINY, "model_type": "mistral", "head_dim": 40, "num_key_value_heads": 1},
}


def _hf_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        state = AutoModelForCausalLM.from_config(config).state_dict()
    return [(n, tuple(t.shape)) for n, t in state.items()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_shapes_equal_transformers_state_dict(case):
    from transformers import AutoConfig

    fields = copy.deepcopy(CASES[case])
    model_type = fields.pop("model_type")
    if case.startswith("preset-"):  # real sizes: two layers say as much as all of them
        fields["num_hidden_layers"] = 2
    hf = AutoConfig.for_model(model_type, **copy.deepcopy(fields))
    ours = dense_checkpoint_shapes(plain_hf_config(model_type, fields))
    if ours is None:
        assert model_type not in ("llama", "mistral", "qwen2", "qwen3")
        return
    assert list(ours.items()) == _hf_shapes(hf)  # names, shapes and order
    assert dense_checkpoint_shapes(hf) == ours  # a transformers config reads the same
