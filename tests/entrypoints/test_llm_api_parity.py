"""The offline API against vLLM's: `from meshserve import LLM, SamplingParams` and LLM.generate as a vLLM script
calls it (vllm/entrypoints/llm.py, vllm/v1/engine/input_processor.py, vllm/outputs.py), on the tiny llama."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshserve import LLM, CompletionOutput, RequestOutput, SamplingParams, TextPrompt, TokensPrompt
from meshserve.entrypoints.llm import _vllm_keywords
from meshserve.errors import InvalidArgumentError, PromptTooLongError
from tests.conftest import VOCAB

MAX_MODEL_LEN = 64
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("llama"), block_size=4, max_model_len=MAX_MODEL_LEN)
    yield llm
    llm.shutdown()


def _clean(llm) -> bool:
    return not llm.engine.has_unfinished_requests() and llm.engine.scheduler.block_manager.usage == 0.0


def test_top_level_names_as_vllm_exports_them():
    import meshserve

    for name in ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "TextPrompt", "TokensPrompt",
                 "PromptType", "EngineArgs"):
        assert getattr(meshserve, name) is not None and name in meshserve.__all__
    # importing the package (for SamplingParams) loads no torch: LLM comes lazily
    code = "import sys, meshserve; meshserve.SamplingParams(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_prompt_form_and_the_input_order(llm):
    ids = [5, 17, 40, 99]
    prompts = ["hello", TextPrompt(prompt="hi there"), TokensPrompt(prompt_token_ids=ids),
               {"prompt_token_ids": ids, "prompt": "as given"}]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == ["hello", "hi there", None, "as given"]
    assert outs[2].prompt_token_ids == ids and outs[2].outputs[0].token_ids == outs[3].outputs[0].token_ids
    # one prompt alone (a string or a dict) is a batch of one; each result is what it gives alone
    alone = [llm.generate(p, GREEDY, use_tqdm=False) for p in prompts]
    assert all(len(a) == 1 for a in alone)
    assert [a[0].outputs[0].token_ids for a in alone] == [o.outputs[0].token_ids for o in outs]
    assert llm.generate([], GREEDY) == []
    assert len(llm.generate(("a", "b"), GREEDY, use_tqdm=True)) == 2  # any sequence; the default bar drawn


def test_sampling_params_one_per_prompt_or_one_for_all(llm):
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in (1, 3, 2)]
    outs = llm.generate(["a", "b", "c"], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 3, 2]
    with pytest.raises(ValueError, match=r"lengths of prompts \(3\) and sampling_params \(2\)"):
        llm.generate(["a", "b", "c"], params[:2], use_tqdm=False)
    assert _clean(llm)


def test_refused_prompts_raise_before_anything_runs(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", GREEDY, use_tqdm=False)
    for bad in (VOCAB + 7, -1):  # named, as vLLM's "Token id N is out of vocabulary"
        with pytest.raises(ValueError, match=f"Token id {bad} is out of vocabulary"):
            llm.generate({"prompt_token_ids": [5, bad, 6]}, GREEDY, use_tqdm=False)
    too_long = {"prompt_token_ids": [5] * (MAX_MODEL_LEN + 1)}
    with pytest.raises(PromptTooLongError, match="max_model_len") as e:
        llm.generate(["a", too_long, "b"], GREEDY, use_tqdm=False)
    assert isinstance(e.value, ValueError) and "prompt 1 of the 3" in "".join(e.value.__notes__)
    with pytest.raises(ValueError, match="max_model_len"):  # no room for one new token: vLLM refuses it too
        llm.generate({"prompt_token_ids": [5] * MAX_MODEL_LEN}, GREEDY, use_tqdm=False)
    # nothing of the refused batch stayed queued: the next batch gets its own answers only
    assert _clean(llm)
    outs = llm.generate(["a", "b"], GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == ["a", "b"] and all(o.finished for o in outs)


def test_max_tokens_past_the_context_is_cut_as_vllm_does_offline(llm):
    # vLLM's offline LLM stops such a request at max_model_len (finish_reason "length"), it does not refuse it
    prompt = {"prompt_token_ids": [5] * (MAX_MODEL_LEN - 4)}
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=50, min_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert _clean(llm)


def test_output_fields_as_vllm(llm):
    out = llm.generate("hello", GREEDY, use_tqdm=False)[0]
    assert isinstance(out, RequestOutput) and isinstance(out.outputs[0], CompletionOutput)
    assert isinstance(out.request_id, str) and out.finished and out.prompt == "hello" and out.prompt_token_ids
    assert out.prompt_logprobs is None and out.num_cached_tokens >= 0 and out.metrics is not None
    assert (out.lora_request, out.encoder_prompt, out.encoder_prompt_token_ids) == (None, None, None)
    assert out.multi_modal_placeholders == {}
    c = out.outputs[0]
    assert (c.index, c.finish_reason, c.stop_reason, c.logprobs, c.cumulative_logprob) == (0, "length", None, None,
                                                                                           None)
    assert len(c.token_ids) == 4 and isinstance(c.text, str) and c.finished() and c.lora_request is None

    scored = llm.generate("hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2),
                          use_tqdm=False)[0].outputs[0]
    assert scored.token_ids == c.token_ids and len(scored.logprobs) == 4
    assert all(t in pos and 1 <= len(pos) <= 3 for t, pos in zip(scored.token_ids, scored.logprobs))
    assert scored.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(scored.token_ids,
                                                                                       scored.logprobs)), abs=1e-4)


def test_stop_reasons_and_n(llm):
    free = llm.generate("hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop_id = free.token_ids[2]
    by_id = llm.generate("hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                 stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    first = free.token_ids.index(stop_id)
    assert (by_id.finish_reason, by_id.stop_reason) == ("stop", stop_id)
    assert by_id.token_ids == free.token_ids[:first + 1]
    many = llm.generate(["a", "b"], SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=3), use_tqdm=False)
    assert [[c.index for c in o.outputs] for o in many] == [[0, 1, 2], [0, 1, 2]]


def test_detokenize_false_returns_token_ids_only(llm):
    with_text = llm.generate("hello", GREEDY, use_tqdm=False)[0].outputs[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1, detokenize=False)
    ids_only = llm.generate("hello", params, use_tqdm=False)[0].outputs[0]
    assert ids_only.text == "" and ids_only.token_ids == with_text.token_ids
    assert all(lp.decoded_token is None for pos in ids_only.logprobs for lp in pos.values())
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)


def test_max_logprobs_bounds_logprobs(llm, monkeypatch):
    monkeypatch.setattr(llm, "max_logprobs", 2)  # as LLM(max_logprobs=2) sets it
    llm.generate("a", SamplingParams(max_tokens=1, logprobs=2), use_tqdm=False)
    for kw in (dict(logprobs=3), dict(prompt_logprobs=5)):
        with pytest.raises(ValueError, match="greater than max allowed: 2") as e:
            llm.generate(["a", "b"], SamplingParams(max_tokens=1, **kw), use_tqdm=False)
        assert e.value.param == next(iter(kw))
    assert _clean(llm)


def test_constructor_keywords(tiny_model_dir):
    model = tiny_model_dir("llama")
    # an unknown keyword is a TypeError (vLLM's EngineArgs raises one), named, with the nearest known name
    with pytest.raises(TypeError, match=r"'max_model_lenn' \(did you mean 'max_model_len'\?\)"):
        LLM(model=model, max_model_lenn=64)
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(model=model, not_an_arg=1)
    # vLLM's keywords meshserve cannot honour: refused as `meshserve serve` refuses the same flags
    for kw, match in ((dict(swap_space=4), "swap_space.*preempts by recompute"),
                      (dict(enable_lora=True), "LoRA"), (dict(revision="main"), "revision"),
                      (dict(cpu_offload_gb=2), "cpu_offload_gb"), (dict(tokenizer_mode="slow"), "tokenizer_mode"),
                      (dict(runner="pooling"), "runner"), (dict(max_logprobs=50), "max_logprobs")):
        with pytest.raises(ValueError, match=match):
            LLM(model=model, **kw)
    # ... unless the value asks for nothing, as a vLLM script often spells its defaults out
    rest, max_logprobs = _vllm_keywords(dict(swap_space=0, enable_lora=False, revision=None, tokenizer_mode="auto",
                                             runner="generate", max_logprobs=5, block_size=4))
    assert rest == {"block_size": 4} and max_logprobs == 5


def test_constructor_keywords_are_treated_as_serve_treats_their_flags(caplog):
    # one rule for both (vllm_compat_args.vllm_flag_treatment): "refused unless meshserve's own value" ...
    for kw, match in ((dict(logprobs_mode="processed_logprobs"), r"LLM\(logprobs_mode='processed_logprobs'\): "
                                                                 "logprobs are those of the raw logits"),
                      (dict(decode_context_parallel_size=2), "context parallelism"),
                      (dict(model_impl="transformers"), "own implementation"),
                      (dict(data_parallel_size_local=2), "data_parallel_size_local"),
                      (dict(structured_outputs_config={"disable_any_whitespace": True}), "disable_any_whitespace"),
                      (dict(compilation_config={"mode": 3}), "torch.compile")):
        with pytest.raises(InvalidArgumentError, match=match) as e:
            _vllm_keywords(kw)
        assert e.value.param == next(iter(kw)) and not isinstance(e.value, TypeError)
    # ... passes at meshserve's own value (as vLLM's default spelled out), as the flag does
    rest, _ = _vllm_keywords(dict(logprobs_mode="raw_logprobs", decode_context_parallel_size=1, model_impl="vllm",
                                  convert="none", offload_group_size=0, worker_extension_cls="", max_loras=1,
                                  cpu_offload_gb=0.0, data_parallel_size_local=1, block_size=4))
    assert rest == {"block_size": 4}
    # the no-ops outside NO_OP_ARGS' plain entries: taken and logged, with why
    with caplog.at_level("INFO", logger="meshserve"):
        rest, _ = _vllm_keywords(dict(structured_outputs_config={"backend": "xgrammar"}, stream_interval=4,
                                      trust_remote_code=True))
    assert rest == {}
    logged = " ".join(r.getMessage() for r in caplog.records)
    for name in ("structured_outputs_config", "stream_interval", "trust_remote_code"):
        assert f"LLM({name}=...) has no effect" in logged
    # vLLM's server-only flags are no LLM(...) keywords (vLLM's EngineArgs takes none): left for the unknown check
    rest, _ = _vllm_keywords(dict(log_config_file="x.json", enable_request_id_headers=True))
    assert rest == {"log_config_file": "x.json", "enable_request_id_headers": True}


def test_methods_meshserve_does_not_implement_say_so(llm):
    for name in ("encode", "embed", "classify", "score", "reward", "beam_search"):
        with pytest.raises(NotImplementedError, match="not implemented"):
            getattr(llm, name)(["hi"])
    for call in (lambda: llm.generate("hi", GREEDY, use_tqdm=False, lora_request=object()),
                 lambda: llm.chat([{"role": "user", "content": "hi"}], GREEDY, lora_request=object())):
        with pytest.raises(InvalidArgumentError, match="LoRA"):
            call()
    assert llm.generate("hi", GREEDY, use_tqdm=False, lora_request=None)[0].finished
    assert llm.llm_engine is llm.engine and llm.get_tokenizer() is llm.engine.tokenizer
    assert llm.get_tokenizer().encode("hello")
    out = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>user") and len(out.outputs[0].token_ids) == 4


def test_generation_config_defaults_apply_only_without_sampling_params(greedy_model):
    # vLLM's LLM.generate: sampling_params=None -> get_default_sampling_params() (generation_config.json's
    # temperature 0 and max_new_tokens 5 here); a SamplingParams given is used as it is
    llm = LLM(model=greedy_model, block_size=4, max_model_len=MAX_MODEL_LEN)
    try:
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.max_tokens) == (0.0, 5)
        first, again = (llm.generate("hello", use_tqdm=False)[0].outputs[0] for _ in range(2))
        assert first.token_ids == again.token_ids and len(first.token_ids) <= 5
        assert len(llm.generate("hello", SamplingParams(ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids) \
            == 16
    finally:
        llm.shutdown()
