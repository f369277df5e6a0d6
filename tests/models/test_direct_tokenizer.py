"""direct_tokenizer loads the tokenizer AutoTokenizer loads (same class, ids, text, special tokens, chat
template), without importing AutoTokenizer where it follows its choice, and hands everything else to it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
import transformers
from transformers import AutoTokenizer
from transformers.models.auto import tokenization_auto

from meshserve.models import direct_tokenizer
from meshserve.models.direct_tokenizer import CLASS_BY_NAME, direct_class
from tests.conftest import _train_tokenizer

TEXTS = ["The capital of France is Paris.", " leading space and  double  spaces",
         "café naïve 東京 🙂 0123",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>x<|endoftext|>", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


# the parity tests hold the direct path to the installed transformers, so they need one the module follows
needs_verified = pytest.mark.skipif(not direct_tokenizer._verified(transformers.__version__),
                                    reason="installed transformers outside direct_tokenizer's verified range")


@pytest.mark.parametrize("version,verified", [("5.24.0", True), ("5.30.1.dev0", True), ("5.17.0", False),
                                              ("4.57.1", False), ("6.0.0", False), ("", False), ("x.y", False)])
def test_only_the_verified_transformers_releases_take_the_direct_path(tokenizer_folder, monkeypatch, version,
                                                                      verified):
    if verified and not direct_tokenizer._verified(transformers.__version__):
        pytest.skip("the direct path itself needs a verified transformers installed")
    monkeypatch.setattr(direct_tokenizer, "transformers_version", lambda: version)
    folder = tokenizer_folder("bytelevel", "qwen3", "Qwen2Tokenizer")
    assert (direct_class(str(folder), {}) is not None) == verified
    if not verified:  # load() hands the folder to AutoTokenizer without touching 5.2x-only internals
        monkeypatch.setattr(direct_tokenizer, "direct_class", lambda *a: pytest.fail("direct path taken"))
        assert type(direct_tokenizer.load(str(folder))).__name__ == type(AutoTokenizer.from_pretrained(str(folder))).__name__


@needs_verified
def test_the_copied_tables_are_transformers_own():
    for model_type, name in direct_tokenizer.REGISTERED_CLASS.items():
        assert tokenization_auto.TOKENIZER_MAPPING_NAMES.get(model_type) == name, model_type
        assert (model_type in direct_tokenizer.INCORRECT_HUB_CLASS) == (
            model_type in tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), model_type
    assert list(direct_tokenizer.TOKENIZERS_BACKEND_IDS) == tokenization_auto.MODEL_IDS_TO_TOKENIZERS_BACKEND
    for name in CLASS_BY_NAME:
        ours = direct_tokenizer._class_from_name(name)
        assert ours is tokenization_auto.tokenizer_class_from_name(name), name


def _metaspace_tokenizer():
    """A small SentencePiece-style (Metaspace, not ByteLevel) BPE, as Llama 2 / Mistral ship."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(TEXTS[:3] * 20, trainer)
    fast = TokenizersBackend(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
    return fast


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """(kind, model_type, tokenizer_class, extra tokenizer_config fields) -> a folder with config.json and the
    tokenizer of `kind` ("bytelevel": conftest's, "metaspace") saved under that class name."""
    made: dict = {}
    saved = {"bytelevel": _train_tokenizer(400), "metaspace": _metaspace_tokenizer()}
    saved["bytelevel"].pad_token = "<|endoftext|>"
    saved["bytelevel"].padding_side = "left"

    def get(kind: str, model_type: str, tokenizer_class: str | None, **extra) -> str:
        key = (kind, model_type, tokenizer_class, json.dumps(extra, sort_keys=True))
        if key not in made:
            path = tmp_path_factory.mktemp("tok")
            saved[kind].save_pretrained(path)
            config_path = path / "tokenizer_config.json"
            config = json.loads(config_path.read_text())
            config.pop("tokenizer_class", None)
            if tokenizer_class is not None:
                config["tokenizer_class"] = tokenizer_class
            config_path.write_text(json.dumps({**config, **extra}))
            (path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 400}))
            made[key] = str(path)
        return made[key]

    return get


def _assert_same(ours, theirs):
    assert type(ours) is type(theirs)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids",
                 "all_special_tokens", "padding_side", "truncation_side", "model_max_length", "chat_template",
                 "add_bos_token", "add_eos_token", "init_kwargs"):
        assert getattr(ours, attr, None) == getattr(theirs, attr, None), attr
    assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab()
    assert {i: str(t) for i, t in ours.added_tokens_decoder.items()} == {
        i: str(t) for i, t in theirs.added_tokens_decoder.items()}
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    if theirs.pad_token is not None:
        assert ours(TEXTS[:3], padding=True)["input_ids"] == theirs(TEXTS[:3], padding=True)["input_ids"]
    if theirs.chat_template:
        for tokenize in (False, True):
            kw = {"tokenize": tokenize, "add_generation_prompt": True}
            assert ours.apply_chat_template(MESSAGES, **kw) == theirs.apply_chat_template(MESSAGES, **kw)


def _load_both(path: str):
    return direct_tokenizer.load(path, local_files_only=True), AutoTokenizer.from_pretrained(
        path, local_files_only=True)


CLASSES = ["PreTrainedTokenizerFast", "TokenizersBackend", "Qwen2Tokenizer", "Qwen2TokenizerFast",
           "LlamaTokenizerFast", "LlamaTokenizer", "GPT2Tokenizer", "GPT2TokenizerFast"]


@needs_verified
@pytest.mark.parametrize("tokenizer_class", CLASSES)
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "deepseek_v3"])
def test_a_byte_level_tokenizer_loads_as_autotokenizer_loads_it(tokenizer_folder, model_type,
                                                                 tokenizer_class):
    path = tokenizer_folder("bytelevel", model_type, tokenizer_class)
    assert direct_class(path, {"local_files_only": True}) is not None  # the direct path, not the fallback
    _assert_same(*_load_both(path))


METASPACE_CLASSES = ["LlamaTokenizerFast", "LlamaTokenizer", "PreTrainedTokenizerFast", "Qwen2Tokenizer"]


@needs_verified
@pytest.mark.parametrize("tokenizer_class", METASPACE_CLASSES)
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3_moe"])
def test_a_metaspace_tokenizer_loads_as_autotokenizer_loads_it(tokenizer_folder, model_type,
                                                                tokenizer_class):
    path = tokenizer_folder("metaspace", model_type, tokenizer_class)
    assert direct_class(path, {"local_files_only": True}) is not None
    _assert_same(*_load_both(path))


@needs_verified
def test_the_classes_differ_where_autotokenizer_picks_them_differently(tokenizer_folder):
    """The cases above are not all one class: the choice is followed, not defaulted."""
    cases = {("bytelevel", "llama", "LlamaTokenizerFast"): "TokenizersBackend",  # ByteLevel Llama 3
             ("metaspace", "llama", "LlamaTokenizer"): "LlamaTokenizer",
             ("bytelevel", "qwen3", "Qwen2Tokenizer"): "Qwen2Tokenizer",
             ("metaspace", "qwen2", "LlamaTokenizer"): "Qwen2Tokenizer",  # qwen2's hub class is not trusted
             ("metaspace", "qwen3", "LlamaTokenizer"): "LlamaTokenizer",
             ("bytelevel", "qwen3", "LlamaTokenizer"): "TokenizersBackend",
             ("bytelevel", "llama", "GPT2Tokenizer"): "GPT2Tokenizer"}
    picked = {case: direct_class(tokenizer_folder(*case), {"local_files_only": True}).__name__
              for case in cases}
    assert picked == cases


@needs_verified
def test_the_embedded_model_tokenizer_loads_as_autotokenizer_loads_it():
    from meshserve.config import EngineArgs
    from meshserve.engine.early_tokenizer import tokenizer_dir_of

    path = tokenizer_dir_of(EngineArgs(model=None))
    assert direct_class(path, {"local_files_only": True}) is not None
    _assert_same(*_load_both(path))


def _without_config_json(folder: str, dest: Path) -> str:
    dest.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dest / f).write_text((Path(folder) / f).read_text())
    return str(dest)


@needs_verified
@pytest.mark.parametrize("kind,tokenizer_class,expected", [
    *[("bytelevel", c, "TokenizersBackend" if c.startswith("Llama") else None) for c in CLASSES],
    *[("metaspace", c, None) for c in METASPACE_CLASSES]])
def test_a_tokenizer_without_config_json_loads_as_autotokenizer_loads_it(tokenizer_folder, tmp_path, kind,
                                                                         tokenizer_class, expected):
    """A tokenizer folder alone (--tokenizer DIR, the start-up probe's /tmp/tok): AutoTokenizer goes on with a
    bare config (model type ""); through AutoTokenizer it imported torch in the API process (~3 s here)."""
    path = _without_config_json(tokenizer_folder(kind, "llama", tokenizer_class), tmp_path / "tok")
    cls = direct_class(path, {"local_files_only": True})
    assert cls is not None and cls.__name__ == (expected or cls.__name__)
    _assert_same(*_load_both(path))


@needs_verified
@pytest.mark.parametrize("case", ["auto_map", "unknown class", "mistral", "gpt2 model type", "no class",
                                  "no class nor config.json", "backend checkpoint id", "switch",
                                  "other kwargs"])
def test_what_direct_tokenizer_does_not_follow_goes_to_autotokenizer(tokenizer_folder, case, monkeypatch,
                                                                     tmp_path):
    kind, model_type, cls, extra, kwargs = "bytelevel", "llama", "PreTrainedTokenizerFast", {}, {}
    if case == "auto_map":
        extra = {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}
    elif case == "unknown class":
        cls = "BertTokenizer"
    elif case == "mistral":
        model_type = "mistral"
    elif case == "gpt2 model type":
        model_type = "gpt2"
    elif case in ("no class", "no class nor config.json"):
        cls = None
    elif case == "switch":
        monkeypatch.setenv("MESHSERVE_TOKENIZER_LOADER", "auto")
    elif case == "other kwargs":
        kwargs = {"trust_remote_code": True}
    path = tokenizer_folder(kind, model_type, cls, **extra)
    if case == "no class nor config.json":
        path = _without_config_json(path, tmp_path / "no-config")
    elif case == "backend checkpoint id":
        config = json.loads((Path(path) / "config.json").read_text())
        path = str(tmp_path / "named")
        os.mkdir(path)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (Path(path) / f).write_text((Path(tokenizer_folder(kind, model_type, cls)) / f).read_text())
        (Path(path) / "config.json").write_text(json.dumps(
            {**config, "_name_or_path": "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct"}))
    assert direct_class(path, {"local_files_only": True, **kwargs}) is None
    calls = []
    real = AutoTokenizer.from_pretrained.__func__

    def recording(cls_, p, *args, **kw):
        calls.append(p)
        return real(cls_, p, *args, **kw)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(recording))
    ours = direct_tokenizer.load(path, local_files_only=True, **kwargs)
    assert calls == [path]
    monkeypatch.undo()
    _assert_same(ours, AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs))


@needs_verified
def test_a_config_json_remote_code_map_keeps_the_direct_path(tokenizer_folder, tmp_path):
    """DeepSeek-V3's config.json maps AutoConfig to remote code; AutoConfig still uses transformers' class for
    its model type, so the tokenizer choice is the same."""
    src = Path(tokenizer_folder("bytelevel", "deepseek_v3", "LlamaTokenizerFast"))
    path = tmp_path / "deepseek"
    path.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_text((src / f).read_text())
    (path / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v3", "vocab_size": 400,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model"}}))
    assert direct_class(str(path), {"local_files_only": True}) is not None
    _assert_same(*_load_both(str(path)))


@needs_verified
@pytest.mark.parametrize("tokenizer_alone", [False, True])
def test_the_front_end_loads_its_tokenizer_without_torch_or_autotokenizer(tokenizer_folder, tmp_path,
                                                                          tokenizer_alone):
    """The embedded model; a preset on dummy weights with --tokenizer DIR (a folder without config.json)."""
    args = "model=None"
    if tokenizer_alone:
        path = _without_config_json(tokenizer_folder("bytelevel", "llama", "LlamaTokenizerFast"), tmp_path / "t")
        args = f"model='llama-3.1-8b', load_format='dummy', tokenizer={path!r}"
    # one process: the front end's load, then the old path's (MESHSERVE_TOKENIZER_LOADER=auto, read at each load),
    # which does import them: the measure can fail (a second process for it cost another start-up)
    code = (
        "import os, sys\n"
        "from meshserve.config import EngineArgs\n"
        "from meshserve.serve.api_server import _import_front_end\n"
        "from meshserve.engine.early_tokenizer import EarlyTokenizer, tokenizer_dir_of\n"
        f"args = EngineArgs({args})\n"
        "_import_front_end(args)\n"
        "for loader in ('', 'auto'):\n"
        "    os.environ['MESHSERVE_TOKENIZER_LOADER'] = loader\n"
        "    tok = EarlyTokenizer(args).load(tokenizer_dir_of(args))\n"
        "    assert tok('hello')['input_ids'], tok\n"
        "    print(sorted(m for m in ('torch', 'transformers.models.auto.tokenization_auto',\n"
        "                             'transformers.configuration_utils') if m in sys.modules), flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    front_end, old_path = out.stdout.strip().splitlines()[-2:]
    assert front_end == "[]", out.stdout + out.stderr
    assert "transformers.models.auto.tokenization_auto" in old_path, out.stdout + out.stderr
