"""Grammar compilation in the engine core, on worker threads, so the step loop never waits for it.

xgrammar releases the GIL while it compiles, so a slow schema costs the step loop almost nothing; requests
wait for their grammar outside the scheduler (engine/grammar_waitlist.py). Compiled grammars are cached per
spec by xgrammar's compiler; concurrent requests with one spec share one future here.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any

from meshserve.structured.grammar import compile_structured_outputs, grammar_backend
from meshserve.structured.params import StructuredOutputsParams

logger = logging.getLogger(__name__)


class GrammarCompiler:
    """Compiles constraints against the model's vocabulary; built lazily, on the first constrained request's
    compile thread (xgrammar's import and the tokenizer's load and vocabulary scan: ~2 s for SmolLM2 on a CPU,
    where a schema's compile takes 8 ms), so a core that serves no grammar never imports xgrammar."""

    def __init__(self, tokenizer_path: str | None, vocab_size: int, eos_token_ids: list[int],
                 max_workers: int = 2):
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._futures: dict[tuple[str, str], concurrent.futures.Future] = {}

    def _xgr_compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = grammar_backend()

                from meshserve.models import direct_tokenizer  # AutoTokenizer's tokenizer, without its imports

                if not self.tokenizer_path:
                    raise ValueError("this model has no tokenizer, so structured outputs are unavailable")
                tok = direct_tokenizer.load(self.tokenizer_path, local_files_only=True)
                eos = sorted(set(self.eos_token_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
                info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=self.vocab_size, stop_token_ids=eos)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
                logger.info("grammar compiler ready (vocabulary of %d, stop ids %s)", self.vocab_size, eos)
            return self._compiler

    def submit(self, params: StructuredOutputsParams) -> concurrent.futures.Future:
        """A future of the CompiledGrammar; one compile per spec while it is cached here."""
        key = params.key
        fut = self._futures.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = self._pool.submit(lambda: compile_structured_outputs(self._xgr_compiler(), params))
            if len(self._futures) > 1024:  # xgrammar keeps its own cache: this map only dedups in-flight work
                self._futures.clear()
            self._futures[key] = fut
        return fut

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
