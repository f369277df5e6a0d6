"""The front end's tokenizer, loaded on a thread while the engine core loads the model.

The core says which tokenizer to load (CoreInfo.tokenizer) only once it is ready, so the front end loaded it
after: up to a second more of start-up for a large tokenizer. Where the arguments already name the folder
(--tokenizer, a model folder holding a tokenizer, the embedded model), it loads now; `load(path)` hands it over
if the core names the same folder, else loads what the core names (the same way as before). The output
processor's own copy of it (OutputProcessor) is made on the thread too: a deep copy of a large tokenizer takes
~0.5-1 s, which would otherwise come after the core is ready, on the start-up's critical path.
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import threading

from meshserve.config import EngineArgs
from meshserve.engine.input_processor import load_tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def tokenizer_dir_of(args: EngineArgs) -> str | None:
    """The folder the core will name for args' tokenizer, where that is known without loading anything."""
    if args.tokenizer:
        return args.tokenizer
    if args.model is None:
        from meshserve.models.embedded import find_embedded_gguf
        from meshserve.models.gguf_cache import cached_hf_dir_for_gguf  # file-locked: safe beside the core

        return str(cached_hf_dir_for_gguf(find_embedded_gguf(), progress=False))
    if os.path.isdir(args.model) and any(
        os.path.exists(os.path.join(args.model, f)) for f in _TOKENIZER_FILES
    ):
        return args.model
    return None


def has_no_tokenizer(args: EngineArgs) -> bool:
    """Whether args' model can have no tokenizer (a preset or a config.json on dummy weights, no --tokenizer):
    then the front end needs no transformers at all (token-id prompts only)."""
    if args.tokenizer or args.model is None or (os.path.exists(args.model) and not args.model.endswith(".json")):
        return False
    from meshserve.models.presets import PRESETS

    if args.model.endswith(".json"):
        return os.path.isfile(args.model) and args.load_format == "dummy"
    return args.model.lower() in PRESETS


class EarlyTokenizer:
    """Starts loading args' tokenizer on a daemon thread (nothing waits for it at exit)."""

    def __init__(self, args: EngineArgs):
        self._future: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                path = tokenizer_dir_of(args)
                tokenizer = load_tokenizer(path) if path else None
                self._future.set_result((path, tokenizer, copy.deepcopy(tokenizer)))
            except BaseException as e:  # noqa: BLE001 - load() loads again and raises it where it belongs
                self._future.set_exception(e)

        threading.Thread(target=run, name="meshserve-early-tokenizer", daemon=True).start()

    def load(self, path: str | None):
        """The tokenizer of `path` (the core's CoreInfo.tokenizer): the early one if it is that folder's."""
        try:
            early_path, tokenizer, _ = self._future.result()
        except Exception:  # noqa: BLE001
            early_path = None
        if path and early_path and os.path.realpath(early_path) == os.path.realpath(path):
            return tokenizer
        return load_tokenizer(path)

    def copy_of(self, tokenizer):
        """A deep copy of `tokenizer` (the output processor's own): made on the thread for the early one."""
        try:
            _, early, early_copy = self._future.result()
        except Exception:  # noqa: BLE001
            early = None
        if tokenizer is not None and tokenizer is early:
            return early_copy
        return copy.deepcopy(tokenizer)
