"""The offline API in vLLM's shape: LLM(model=..., **engine_args).generate(prompts, sampling_params)."""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC

from meshserve.config import EngineArgs
from meshserve.engine import startup_timeline
from meshserve.engine.args_check import check_engine_args
from meshserve.engine.chat_template import render_chat, render_chat_text, text_content
from meshserve.engine.heap import heap_frozen_while_running, offline_freeze_mode
from meshserve.engine.input_processor import PromptType
from meshserve.engine.llm_engine import LLMEngine
from meshserve.errors import EngineDeadError, InvalidArgumentError, PromptTooLongError
from meshserve.outputs import RequestOutput
from meshserve.sampling import RequestOutputKind, SamplingParams
from meshserve.engine.chat_content_format import resolve_content_format, with_content_format

logger = logging.getLogger(__name__)

Conversation = list[dict]

# vLLM's most logprobs per position (its --max-logprobs default) and meshserve's ceiling
_MAX_LOGPROBS = 20
_NO_LORA = "LoRA adapters are not supported yet (merge the adapter into the weights)"
_NOT_GENERATIVE = ("meshserve serves generative models only: embeddings, classification, scores and rewards are "
                   "not implemented (use generate() or chat())")


class UnknownEngineArgumentError(InvalidArgumentError, TypeError):
    """LLM(...) given a keyword no engine argument has: a TypeError, as vLLM's EngineArgs raises (and an
    InvalidArgumentError, as meshserve's other configuration errors)."""


def _vllm_keywords(kwargs: dict) -> tuple[dict, int]:
    """vLLM's LLM(...) keywords that are not meshserve engine arguments, treated as `meshserve serve` treats
    the same flags (serve/vllm_compat_args.vllm_flag_treatment): refused with what to use instead, taken as
    no-ops (logged, with why), or dropped where they ask for what meshserve does (a vLLM default spelled out).
    Returns the remaining keywords and max_logprobs."""
    # light: refusals come before torch loads
    from meshserve.serve.vllm_compat_args import vllm_flag_treatment, vllm_keyword_flag

    kwargs = dict(kwargs)
    for name in [n for n in kwargs if n not in EngineArgs.field_names()]:
        flag = vllm_keyword_flag(name)
        if flag is None:
            continue
        # data_parallel_size is no LLM(...) keyword here (nor, above 1, vLLM's): data_parallel_size_local 1 only
        why = vllm_flag_treatment(flag, kwargs.pop(name), data_parallel_size=1, keyword=True)
        if why is not None:
            logger.info("LLM(%s=...) has no effect: %s", name, why)
    mode = kwargs.pop("tokenizer_mode", "auto")
    if mode not in ("auto", "hf"):
        raise InvalidArgumentError(f"tokenizer_mode {mode!r} is not supported: meshserve loads the tokenizer "
                                   "folder's fast tokenizer (auto)", param="tokenizer_mode")
    runner = kwargs.pop("runner", "auto")
    if runner not in ("auto", "generate"):
        raise InvalidArgumentError(f"runner {runner!r} is not supported: meshserve serves generative models "
                                   "(embeddings and scores are not implemented)", param="runner")
    max_logprobs = kwargs.pop("max_logprobs", _MAX_LOGPROBS)
    if max_logprobs is None:
        max_logprobs = _MAX_LOGPROBS
    if not (isinstance(max_logprobs, int) and not isinstance(max_logprobs, bool)
            and 0 <= max_logprobs <= _MAX_LOGPROBS):
        raise InvalidArgumentError(f"max_logprobs must be an integer in [0, {_MAX_LOGPROBS}]: meshserve returns "
                                   f"at most {_MAX_LOGPROBS} logprobs per position, got {max_logprobs!r}",
                                   param="max_logprobs")
    return kwargs, max_logprobs


def _unknown_arguments_error(unknown: set[str]) -> UnknownEngineArgumentError:
    known = sorted(EngineArgs.field_names())
    parts = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return UnknownEngineArgumentError(f"unknown engine argument(s): {', '.join(parts)}; LLM(...) takes the fields "
                                      "of meshserve.EngineArgs", param=sorted(unknown)[0])


class LLM:
    """An engine run in-process for batch generation.

    >>> llm = LLM()                      # the embedded SmolLM2-135M-Instruct
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8))
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, **kwargs):
        kwargs, self.max_logprobs = _vllm_keywords(kwargs)
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise _unknown_arguments_error(unknown)
        self.engine_args = EngineArgs(model=model, **kwargs)
        offline_freeze_mode()  # a bad MESHSERVE_OFFLINE_GC_FREEZE is refused before the model loads
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

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's name for the engine behind this LLM (meshserve's LLMEngine: not vLLM's interface)."""
        return self._engine

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
                 use_tqdm: bool | Callable = True, priority: list[int] | None = None, *,
                 lora_request=None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order. priority (one per prompt)
        orders the queue when the engine runs with scheduling_policy="priority" (lower first).

        As vLLM's: every prompt is checked before any runs, and one that is refused (too long, empty, a token
        id outside the vocabulary) raises a ValueError with none of the batch left queued. A max_tokens past
        the end of the context is cut to it (the output then ends with finish_reason "length"), as vLLM's
        offline LLM caps it; `meshserve serve` refuses it instead, as vLLM's server does."""
        if lora_request is not None:
            raise InvalidArgumentError(f"lora_request: {_NO_LORA}", param="lora_request")
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
            if len(params_list) != len(prompts):  # vLLM's _validate_and_add_requests
                raise InvalidArgumentError(f"The lengths of prompts ({len(prompts)}) and sampling_params "
                                           f"({len(params_list)}) must be the same: give one SamplingParams, or "
                                           "one per prompt", param="sampling_params")
        if priority is not None and len(priority) != len(prompts):
            raise InvalidArgumentError("priority must have one value per prompt", param="priority")
        return self._run(prompts, params_list, use_tqdm, priority or [0] * len(prompts))

    def chat(self, messages: Conversation | list[Conversation],
             sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
             use_tqdm: bool | Callable = True, chat_template: str | None = None,
             add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             tools: list[dict] | None = None, chat_template_content_format: str = "auto", *,
             lora_request=None) -> list[RequestOutput]:
        """Render each conversation with the tokenizer's chat template (tools, OpenAI's function tools, reach
        it as in vLLM), then generate; each output's prompt is the rendered text, as vLLM's. Content given as
        OpenAI's text parts reaches the template as one string, or as parts where it loops over them
        (chat_template_content_format: auto, string or openai, vLLM's and `meshserve serve`'s rule)."""
        if lora_request is not None:
            raise InvalidArgumentError(f"lora_request: {_NO_LORA}", param="lora_request")
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
        self._check_logprobs(params_list)
        ids = []
        try:
            for i, (prompt, params, priority) in enumerate(zip(prompts, params_list,
                                                               priorities or [0] * len(prompts))):
                try:
                    ids.append(self._add_request(engine, prompt, _final_only(params), priority))
                except Exception as e:
                    if len(prompts) > 1:
                        e.add_note(f"(prompt {i} of the {len(prompts)} given to generate)")
                    raise
        except Exception:
            for rid in ids:  # as vLLM: nothing of a refused batch stays queued
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
            # the core runs in this process: what exists when the run starts (the model, its graphs, the
            # caller's own objects) is out of the collector's reach while it runs, as the serving core's start-up
            # heap is (engine/heap.py)
            with heap_frozen_while_running(engine.config.device):
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
        outputs = [results[rid] for rid in ids]
        for out, params in zip(outputs, params_list):
            if not params.detokenize:
                _drop_text(out)
        return outputs

    def _check_logprobs(self, params_list) -> None:
        """max_logprobs (vLLM's engine argument): asking for more alternatives per position is a ValueError."""
        if self.max_logprobs >= _MAX_LOGPROBS:  # SamplingParams refuses more than 20 itself
            return
        for params in {id(p): p for p in params_list}.values():
            for name, asked in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
                if asked is not None and asked > self.max_logprobs:
                    what = "sample" if name == "logprobs" else "prompt"
                    raise InvalidArgumentError(f"Requested {what} logprobs of {asked}, which is greater than max "
                                               f"allowed: {self.max_logprobs} (LLM(max_logprobs=...))", param=name)

    @staticmethod
    def _add_request(engine: LLMEngine, prompt, params: SamplingParams, priority: int) -> str:
        """Queue one prompt. A max_tokens that runs past the context is cut to what fits (vLLM's offline LLM
        stops such a request at max_model_len with finish_reason "length" rather than refusing it)."""
        try:
            return engine.add_request(None, prompt, params, priority=priority)
        except PromptTooLongError as e:
            room = _room_for_output(engine, prompt, params) if e.param == "max_tokens" else None
            if room is None or params.max_tokens is None or not 1 <= room < params.max_tokens:
                raise
            capped = dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
            return engine.add_request(None, prompt, capped, priority=priority)

    def encode(self, *args, **kwargs):
        """vLLM's pooling entry point: not implemented (meshserve serves generative models)."""
        raise NotImplementedError(f"LLM.encode(): {_NOT_GENERATIVE}")

    def embed(self, *args, **kwargs):
        raise NotImplementedError(f"LLM.embed(): {_NOT_GENERATIVE}")

    def classify(self, *args, **kwargs):
        raise NotImplementedError(f"LLM.classify(): {_NOT_GENERATIVE}")

    def score(self, *args, **kwargs):
        raise NotImplementedError(f"LLM.score(): {_NOT_GENERATIVE}")

    def reward(self, *args, **kwargs):
        raise NotImplementedError(f"LLM.reward(): {_NOT_GENERATIVE}")

    def beam_search(self, *args, **kwargs):
        raise NotImplementedError("LLM.beam_search(): beam search is not implemented (sample with n > 1, or "
                                  "use temperature=0 for the greedy answer)")

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


def _room_for_output(engine: LLMEngine, prompt, params: SamplingParams) -> int | None:
    """How many tokens fit in max_model_len after this prompt (as truncate_prompt_tokens leaves it). Only the
    context is cut to: a request the KV pool can never hold stays refused (vLLM has no such case: it will not
    start with a pool smaller than max_model_len)."""
    info = engine.core_client.info
    try:
        _, token_ids = engine.input_processor.tokenize_prompt(prompt)
    except InvalidArgumentError:
        return None
    n, keep = len(token_ids), params.truncate_prompt_tokens
    if keep is not None:
        n = min(n, info.max_model_len if keep == -1 else keep)
    return info.max_model_len - n


def _drop_text(out: RequestOutput) -> None:
    """detokenize=False (vLLM's): token ids only, no text, no decoded logprob tokens."""
    for completion in out.outputs:
        completion.text = ""
        for position in completion.logprobs or ():
            for logprob in position.values():
                logprob.decoded_token = None


def _final_only(params: SamplingParams) -> SamplingParams:
    """The same parameters, asking for one output at the end (a batch needs no per-step snapshots)."""
    if params.output_kind is RequestOutputKind.FINAL_ONLY:
        return params
    return dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
