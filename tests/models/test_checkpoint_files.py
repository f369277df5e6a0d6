import json

import pytest
import torch
from safetensors.torch import save_file

from meshserve.errors import ModelLoadError
from meshserve.models.checkpoint_files import iter_checkpoint, load_hf_config, safetensors_files


def _write_sharded(folder):
    save_file({"a": torch.arange(6.0).reshape(2, 3)}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(4)}, str(folder / "model-00002-of-00002.safetensors"))
    save_file({"stray": torch.zeros(1)}, str(folder / "consolidated.safetensors"))  # not in the index
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_the_index_names_the_shards_and_tensors_come_lazily(tmp_path):
    _write_sharded(tmp_path)
    files = safetensors_files(str(tmp_path))
    assert [f.rsplit("/", 1)[1] for f in files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    parts = dict(iter_checkpoint(str(tmp_path)))
    assert sorted(parts) == ["a", "b"]
    assert tuple(parts["a"].get_shape()) == (2, 3)
    assert torch.equal(parts["a"][:], torch.arange(6.0).reshape(2, 3))


def test_without_an_index_every_safetensors_file_counts(tmp_path):
    save_file({"y": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    assert [name for name, _ in iter_checkpoint(str(tmp_path))] == ["x", "y"]


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no weights", "no \\*.safetensors weights"),
        ("missing shard", "missing weight shard model-00002-of-00002.safetensors"),
        ("corrupt index", "corrupt safetensors index"),
        ("corrupt file", "corrupt weights file"),
    ],
)
def test_a_broken_folder_is_one_line_naming_what_is_wrong(tmp_path, breakage, message):
    if breakage != "no weights":
        _write_sharded(tmp_path)
    if breakage == "missing shard":
        (tmp_path / "model-00002-of-00002.safetensors").unlink()
    elif breakage == "corrupt index":
        (tmp_path / "model.safetensors.index.json").write_text("{not json")
    elif breakage == "corrupt file":
        (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match=message):
        list(iter_checkpoint(str(tmp_path)))


def test_an_unreadable_config_is_a_model_load_error(tmp_path, tiny_model_dir):
    assert load_hf_config(tiny_model_dir()).hidden_size > 0
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read the model config"):
        load_hf_config(str(tmp_path))
