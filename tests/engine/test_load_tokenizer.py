"""input_processor.load_tokenizer: a folder transformers cannot make a tokenizer of is one ModelLoadError line
(the model's own folder too, which no flag check looks at before loading)."""

from __future__ import annotations

import pytest

from meshserve.engine.input_processor import load_tokenizer
from meshserve.errors import ModelLoadError


def test_a_folder_without_a_usable_tokenizer_is_one_line(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")  # a config naming no vocabulary
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(str(tmp_path))
    message = str(e.value)
    assert message.startswith(f"cannot load a tokenizer from {tmp_path} (") and "\n" not in message
