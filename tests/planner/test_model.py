"""Parameter counts from shapes: the published totals, MoE total vs active, tied embeddings, config.json input."""

import json

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.models.presets import PRESETS
from meshserve.planner.model import load_model, model_from_config


@pytest.mark.parametrize("name, billions", [
    ("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.55), ("llama-3.1-405b", 405.85), ("qwen3-0.6b", 0.60),
    ("qwen3-8b", 8.19), ("qwen3-32b", 32.76), ("mistral-7b", 7.25), ("mixtral-8x7b", 46.70),
    ("qwen3-30b-a3b", 30.53),
])
def test_total_parameters_match_published(name, billions):
    assert round(load_model(name).total_params / 1e9, 2) == billions


def test_llama_70b_exact_count():
    # 80 × (attention 150,994,944 + MLP 704,643,072 + norms 16,384) + 2 × 128256 × 8192 + final norm
    assert load_model("llama-3.1-70b").total_params == 70_553_706_496


@pytest.mark.parametrize("name, total, active", [("mixtral-8x7b", 46.70, 12.88), ("qwen3-30b-a3b", 30.53, 3.35)])
def test_moe_total_vs_active(name, total, active):
    m = load_model(name)
    assert m.is_moe
    assert round(m.total_params / 1e9, 2) == total and round(m.active_params / 1e9, 2) == active


def test_dense_models_are_fully_active():
    m = load_model("llama-3.1-8b")
    assert m.active_params == m.total_params and not m.is_moe


def test_tied_embeddings_count_once():
    tied = load_model("qwen3-0.6b")
    untied = model_from_config({**PRESETS["qwen3-0.6b"], "tie_word_embeddings": False})
    assert untied.total_params - tied.total_params == tied.vocab_size * tied.hidden_size


def test_from_config_json_file_and_folder(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "tie_word_embeddings": False, "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(str(tmp_path)).total_params == load_model("llama-3.1-8b").total_params
    assert load_model(str(tmp_path / "config.json")).num_kv_heads == 8


def test_hf_ids_and_case_resolve_to_presets():
    assert load_model("meta-llama/Llama-3.1-70B-Instruct").total_params == 70_553_706_496
    assert load_model("Qwen3-8B").num_layers == 36


def test_quantized_checkpoint_dtype_detected():
    base = dict(PRESETS["llama-3.1-8b"])
    assert model_from_config({**base, "quantization_config": {"quant_method": "fp8"}}).checkpoint_dtype == "fp8"
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128}
    assert model_from_config({**base, "quantization_config": awq}).checkpoint_dtype == "int4"


def test_unknown_model_is_an_error():
    with pytest.raises(InvalidArgumentError, match="neither a preset"):
        load_model("no-such-model")
    with pytest.raises(InvalidArgumentError, match="lacks"):
        model_from_config({"hidden_size": 8})


def test_moe_layer_positions_follow_the_config():
    # DeepSeek-V3: layers 0-2 dense; Qwen2-MoE style: mlp_only_layers and decoder_sparse_step leave others dense
    v3 = load_model("deepseek-v3")
    assert v3.moe_layer_ids == tuple(range(3, 61))
    assert v3.moe_layers_in(0, 31) == 28 and v3.moe_layers_in(31, 61) == 30
    cfg = {**PRESETS["qwen3-30b-a3b"], "num_hidden_layers": 8, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    m = model_from_config(cfg)
    assert m.moe_layer_ids == (1, 5, 7) and m.num_moe_layers == 3
    assert [m.moe_layers_in(0, 4), m.moe_layers_in(4, 8)] == [1, 2]


@pytest.mark.parametrize("fields,message", [
    # each was a traceback (ValueError, TypeError, AttributeError, ZeroDivisionError) or a plan of nonsense
    ({"num_key_value_heads": "x"}, "num_key_value_heads must be a whole number, got 'x'"),
    ({"intermediate_size": "x"}, "intermediate_size must be a whole number, got 'x'"),
    ({"hidden_size": True}, "hidden_size must be a whole number, got True"),
    ({"hidden_size": 4096.7}, "hidden_size must be a whole number, got 4096.7"),
    ({"hidden_size": 10**30}, "hidden_size of 1,000,000,000,000,000,000,000,000,000,000 is past any model's"),
    ({"num_key_value_heads": -8}, "num_key_value_heads must be >= 0, got -8"),  # -131,072 KV bytes/token
    ({"head_dim": -128}, "head_dim must be >= 0, got -128"),  # -731 concurrent
    ({"sliding_window": -5}, "sliding_window must be >= 0, got -5"),  # -178,753 concurrent
    ({"num_key_value_heads": 5}, "num_attention_heads 32 is not a multiple of num_key_value_heads 5"),
    ({"num_key_value_heads": 64}, "num_attention_heads 32 is not a multiple of num_key_value_heads 64"),
    ({"num_local_experts": 8, "num_experts_per_tok": 16}, "num_experts_per_tok must be 1 to its 8 experts, got 16"),
    ({"num_local_experts": 8, "num_experts_per_tok": 0}, "num_experts_per_tok must be 1 to its 8 experts, got 0"),
    ({"num_local_experts": -8}, "num_local_experts must be >= 0, got -8"),  # -42.71 B parameters
    ({"num_local_experts": 8, "num_experts_per_tok": 2, "mlp_only_layers": 3}, "mlp_only_layers must be a list"),
    ({"quantization_config": "fp8"}, "quantization_config must be an object, got 'fp8'"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),  # read as tied
    ({"kv_lora_rank": 512, "qk_rope_head_dim": 64}, "MLA (kv_lora_rank 512) needs qk_nope_head_dim"),
])
def test_a_malformed_config_field_is_one_line(fields, message):
    cfg = {**PRESETS["llama-3.1-8b"], **fields}
    with pytest.raises(InvalidArgumentError, match="config.json") as e:
        model_from_config(cfg, name="my-model")
    assert message in str(e.value) and str(e.value).startswith("my-model: ") and "\n" not in str(e.value)


def test_a_config_that_is_not_an_object_is_one_line(tmp_path):
    for text, what in (("[]", "list"), ('{"text_config": "x"}', "text_config must be an object")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(InvalidArgumentError, match=what):
            load_model(str(tmp_path))
