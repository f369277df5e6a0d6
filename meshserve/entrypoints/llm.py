"""The offline API in vLLM's shape: LLM(model=..., **engine_args).generate(prompts, sampling_params)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC

from meshserve.config import EngineArgs
from meshserve.engine import startup_timeline
from meshserve.engine.args_check import check_engine_args
from meshserve.engine.chat_template import render_chat, render_chat_text, text_content
from meshserve.engine.input_processor import PromptType
from meshserve.engine.llm_engine import LLMEngine
from meshserve.errors import EngineDeadError, InvalidArgumentError
from meshserve.outputs import RequestOutput
from meshserve.sampling import RequestOutputKind, SamplingParams
from meshserve.vllm_values import NO_OP_ARGS
from meshserve.engine.chat_content_format import resolve_content_format, with_content_format

logger = logging.getLogger(__name__)

Conversation = list[dict]


class LLM:
    """An engine run in-process for batch generation.

    >>> llm = LLM()                      # the embedded SmolLM2-135M-Instruct
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8))
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, **kwargs):
        for name in NO_OP_ARGS.keys() & kwargs.keys():  # as `meshserve serve` takes these flags
            logger.info("LLM(%s=...) has no effect: %s", name, NO_OP_ARGS[name])
            del kwargs[name]
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise InvalidArgumentError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        self.engine_args = EngineArgs(model=model, **kwargs)
        # the CLI's checks, before anything loads: a missing tokenizer folder or --step-trace folder is named
        # at once, not a FileNotFoundError after the model has loaded
        check_engine_args(self.engine_args)
        startup_timeline.begin("LLM")
        startup_timeline.mark("before LLM()")
        self.engine = LLMEngine.from_engine_args(self.engine_args)
        startup_timeline.mark("tokenizer")
        segments = startup_timeline.merge(startup_timeline.current(), self.engine.core_client.info.startup)
        logger.info("%s", startup_timeline.summary(segments))

    @property
    def _engine(self) -> LLMEngine:
        """The engine, or a clear error after shutdown() (not "'NoneType' object has no attribute ...")."""
        if self.engine is None:
            raise EngineDeadError("this LLM has been shut down")
        return self.engine

    def get_tokenizer(self):
        return self._engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (vLLM's name; benchmarks call it between runs so a repeat prefills
        again); False while requests hold KV blocks."""
        return self._engine.scheduler.block_manager.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams carrying the model's generation_config.json defaults (what generate uses when
        given none); build your own with SamplingParams.from_defaults(llm.generation_defaults, ...)."""
        return SamplingParams.from_defaults(self.generation_defaults)

    @property
    def generation_defaults(self) -> dict:
        return dict(self._engine.core_client.info.generation_defaults)

    def generate(self, prompts: PromptType | SequenceABC[PromptType],
                 sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
                 use_tqdm: bool | Callable = True, priority: list[int] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order. priority (one per prompt)
        orders the queue when the engine runs with scheduling_policy="priority" (lower first)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not hasattr(prompts, "__iter__"):  # None, a number: not "'NoneType' object is not iterable"
            raise InvalidArgumentError(f"prompts must be a string, a prompt dict, token ids or a list of them, got "
                                       f"{type(prompts).__name__}", param="prompts")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params) if isinstance(sampling_params, SequenceABC) else [sampling_params]
            if not all(isinstance(p, SamplingParams) for p in params_list):  # a dict would fail deep in _run
                raise InvalidArgumentError("sampling_params must be a SamplingParams or a list of them, got "
                                           f"{type(sampling_params).__name__}", param="sampling_params")
            if len(params_list) != len(prompts):
                raise InvalidArgumentError("sampling_params must be one object or one per prompt")
        if priority is not None and len(priority) != len(prompts):
            raise InvalidArgumentError("priority must have one value per prompt", param="priority")
        return self._run(prompts, params_list, use_tqdm, priority or [0] * len(prompts))

    def chat(self, messages: Conversation | list[Conversation],
             sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
             use_tqdm: bool | Callable = True, chat_template: str | None = None,
             add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             tools: list[dict] | None = None, chat_template_content_format: str = "auto") -> list[RequestOutput]:
        """Render each conversation with the tokenizer's chat template (tools, OpenAI's function tools, reach
        it as in vLLM), then generate; each output's prompt is the rendered text, as vLLM's. Content given as
        OpenAI's text parts reaches the template as one string, or as parts where it loops over them
        (chat_template_content_format: auto, string or openai, vLLM's and `meshserve serve`'s rule)."""
        if chat_template_content_format not in ("auto", "string", "openai"):
            raise InvalidArgumentError("chat_template_content_format must be auto, string or openai, got "
                                       f"{chat_template_content_format!r}", param="chat_template_content_format")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        render = {"chat_template": chat_template, "add_generation_prompt": add_generation_prompt,
                  "continue_final_message": continue_final_message, "tools": tools,
                  "template_kwargs": chat_template_kwargs}
        tokenizer = self._engine.tokenizer
        # text parts joined for a template that reads a string (the list itself reached it before: its Python repr
        # ended up in the prompt), a string made one part for a template that loops over parts
        content_format = resolve_content_format(chat_template_content_format,
                                                chat_template or getattr(tokenizer, "chat_template", None))
        conversations = [with_content_format(text_content(conv, join=content_format == "string"), content_format)
                         if isinstance(conv, list) else conv for conv in conversations]
        prompts = [{"prompt_token_ids": render_chat(tokenizer, conv, **render),
                    "prompt": render_chat_text(tokenizer, conv, **render)}
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts, params_list, use_tqdm: bool | Callable,
             priorities: list[int] | None = None) -> list[RequestOutput]:
        engine = self._engine
        ids = []
        try:
            for prompt, params, priority in zip(prompts, params_list, priorities or [0] * len(prompts)):
                ids.append(engine.add_request(None, prompt, _final_only(params), priority=priority))
        except Exception:
            for rid in ids:
                engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(ids) > 1:
            from tqdm.auto import tqdm

            # vLLM's use_tqdm may also be the progress bar's class (or a factory of it): used as given
            make_bar = use_tqdm if callable(use_tqdm) else tqdm
            bar = make_bar(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while len(results) < len(ids):
                for out in engine.step(finished_only=True):
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]

    def shutdown(self) -> None:
        """Release the model and the KV cache."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        for rid in list(engine.requests):
            engine.abort_request(rid)
        self.engine = None
        engine.shutdown()
        del engine
        import torch

        if torch.cuda.is_available():
            # the engine's tensors go by reference counting (tests/engine/test_engine_shutdown.py); the
            # collect is for whatever else only the cyclic collector frees, before the caching allocator
            # returns blocks. Without a GPU there is nothing to return, and a full collection of a large heap
            # costs 0.4-1.5 s (each LLM of the test suite paid it)
            import gc

            gc.collect()
            torch.cuda.empty_cache()


def _final_only(params: SamplingParams) -> SamplingParams:
    """The same parameters, asking for one output at the end (a batch needs no per-step snapshots)."""
    if params.output_kind is RequestOutputKind.FINAL_ONLY:
        return params
    return dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
