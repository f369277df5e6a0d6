"""Engine behaviour beyond greedy equality: n, seeds, stops, aborts, limits, errors, async streaming."""

from __future__ import annotations

import asyncio
import random

import pytest

from meshserve import LLM, SamplingParams
from meshserve.config import EngineArgs
from meshserve.engine.async_engine import AsyncLLM
from meshserve.errors import InvalidArgumentError, ModelLoadError, PromptTooLongError, UnsupportedModelError
from tests.conftest import VOCAB


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=tiny_model_dir("llama"), block_size=4, max_model_len=256)


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def test_seeded_sampling_independent_of_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    prompt = {"prompt_token_ids": _ids(0, 12)}
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": _ids(i, 5 + i)} for i in range(1, 5)]
    mixed = llm.generate(others[:2] + [prompt] + others[2:],
                         [SamplingParams(temperature=0.8, max_tokens=7, ignore_eos=True)] * 2 + [params]
                         + [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)] * 2, use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    # a different seed gives a different sample (overwhelmingly likely with 10 tokens over 320 ids)
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=99, ignore_eos=True)
    assert llm.generate([prompt], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_samples_share_prompt_blocks(llm):
    prompt = {"prompt_token_ids": _ids(7, 33)}
    before = llm.engine.stats()["prefix_cache_hits"]
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # distinct seeds per sample
    # samples 1 and 2 reuse the 8 full prompt blocks sample 0 wrote (32 tokens each)
    assert llm.engine.stats()["prefix_cache_hits"] - before >= 64


def test_stop_token_ids_and_min_tokens(llm):
    prompt = {"prompt_token_ids": _ids(8, 10)}
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at],
                                                ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at],
                                                min_tokens=8, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length" and stop_at not in out.token_ids


def test_stop_string_across_tokens_is_cut(llm):
    prompt = "The capital of France"
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = free.text
    assert len(text) >= 6
    stop = text[2:6]  # most likely spans token boundaries in a 320-token BPE
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True,
                                                 include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_text_prompt_and_detokenized_text(llm):
    out = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    assert out.prompt_token_ids == tok("Hello world").input_ids
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_chat_uses_template(llm):
    messages = [{"role": "user", "content": "hi"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.decode(out.prompt_token_ids) == expected
    assert out.prompt == expected  # the rendered text, as vLLM's LLM.chat reports it (it was None)


def test_chat_passes_tools_to_the_template(llm):
    # vLLM's LLM.chat(..., tools=...): the template sees them (it was a TypeError: no such argument)
    template = ("{% for t in tools or [] %}[tool {{ t['function']['name'] }}]{% endfor %}"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=1),
                   use_tqdm=False, chat_template=template, tools=tools)[0]
    assert out.prompt == "[tool get_weather]hi"
    assert out.prompt_token_ids == llm.get_tokenizer()("[tool get_weather]hi", add_special_tokens=False).input_ids


def test_chat_takes_openai_text_parts(llm):
    # the list of parts reached the template as it was: its Python repr was the prompt
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]
    params = SamplingParams(temperature=0, max_tokens=1)
    out = llm.chat(parts, params, use_tqdm=False)[0]
    assert out.prompt == llm.chat([{"role": "user", "content": "hi\nthere"}], params, use_tqdm=False)[0].prompt
    # a template that loops over the parts gets them (auto, as vLLM and `meshserve serve` decide)
    loops = "{% for m in messages %}{% for p in m['content'] %}<{{ p.text }}>{% endfor %}{% endfor %}"
    assert llm.chat(parts, params, use_tqdm=False, chat_template=loops)[0].prompt == "<hi><there>"
    assert llm.chat([{"role": "user", "content": "hi"}], params, use_tqdm=False, chat_template=loops)[0].prompt == "<hi>"
    with pytest.raises(InvalidArgumentError, match="image_url are not supported"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], params)


def test_length_limits_and_rejection(llm):
    # as vLLM's offline LLM: a max_tokens past the context is cut to it (the server refuses it instead)
    out = llm.generate({"prompt_token_ids": _ids(1, 250)}, SamplingParams(max_tokens=10, ignore_eos=True,
                                                                          temperature=0), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"
    with pytest.raises(PromptTooLongError):
        llm.generate({"prompt_token_ids": _ids(1, 256)}, SamplingParams(max_tokens=None), use_tqdm=False)
    # max_tokens=None fills up to max_model_len
    out = llm.generate({"prompt_token_ids": _ids(1, 250)}, SamplingParams(max_tokens=None, ignore_eos=True,
                                                                          temperature=0), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"


def test_bad_inputs_raise_clear_errors(llm, tiny_model_dir):
    with pytest.raises(InvalidArgumentError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidArgumentError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidArgumentError, match="token ids"):
        llm.generate({"prompt_token_ids": [VOCAB + 5]}, use_tqdm=False)
    with pytest.raises(InvalidArgumentError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(InvalidArgumentError, match="unknown engine argument"):
        LLM(model=tiny_model_dir("llama"), not_an_arg=1)
    # the CLI's up-front checks: a missing folder named, not a hub-id error or a FileNotFoundError after loading
    with pytest.raises(ModelLoadError, match="tokenizer folder not found"):
        LLM(model=tiny_model_dir("llama"), tokenizer="/no/such/tokenizer")
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        LLM(model=tiny_model_dir("llama"), step_trace="/no/such/folder/trace.jsonl")
    # wrong types are named, not an AttributeError / TypeError from inside the engine
    with pytest.raises(InvalidArgumentError, match="sampling_params must be a SamplingParams"):
        llm.generate(["hi"], {"temperature": 0}, use_tqdm=False)
    with pytest.raises(InvalidArgumentError, match="sampling_params must be a SamplingParams"):
        llm.generate(["hi", "ho"], [SamplingParams(), None], use_tqdm=False)
    with pytest.raises(InvalidArgumentError, match="prompts must be"):
        llm.generate(None, use_tqdm=False)
    with pytest.raises(InvalidArgumentError, match="prompt_token_ids must be a list"):
        llm.generate({"prompt_token_ids": None}, use_tqdm=False)
    # vLLM's other prompt keys would be dropped without a word (an image of multi_modal_data ignored)
    with pytest.raises(InvalidArgumentError, match="not supported: multi_modal_data"):
        llm.generate({"prompt": "hi", "multi_modal_data": {"image": None}}, use_tqdm=False)
    # a priority this first-come-first-served engine would ignore (vLLM refuses it as well)
    with pytest.raises(InvalidArgumentError, match="needs --scheduling-policy priority"):
        llm.generate(["hi"], SamplingParams(max_tokens=2), use_tqdm=False, priority=[5])
    assert llm.generate(["hi"], SamplingParams(max_tokens=2), use_tqdm=False, priority=[0])[0].finished
    with pytest.raises(InvalidArgumentError, match="4 attention heads are not divisible"):
        LLM(model=tiny_model_dir("llama"), tensor_parallel_size=3)
    with pytest.raises(InvalidArgumentError, match="pipeline_parallel_size 3 exceeds"):
        LLM(model=tiny_model_dir("llama"), pipeline_parallel_size=3)
    # the engine is still usable after rejected requests
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.block_manager.usage == 0.0


def test_vllm_spellings_of_engine_arguments(tiny_model_dir):
    # as a vLLM script writes them: the CLI's no-op trust_remote_code, dtype "half" (the CLI's alias), seed=None
    # (vLLM's V1 engine: seed 0); each was refused or a bare TypeError
    llm = LLM(model=tiny_model_dir("llama"), block_size=4, max_model_len=64, trust_remote_code=True,
              dtype="half", seed=None)
    assert llm.engine_args.dtype == "float16" and llm.engine_args.seed == 0
    assert llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    llm.shutdown()


def test_reset_prefix_cache(llm):
    prompt = {"prompt_token_ids": _ids(7, 40)}
    llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)[0].num_cached_tokens > 0
    assert llm.reset_prefix_cache()
    assert llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)[0].num_cached_tokens == 0


def test_use_tqdm_may_be_the_progress_bar_class(llm):
    # vLLM's use_tqdm takes a tqdm class (or factory) too; it was taken as True and the default bar drawn
    made = []

    class Bar:
        def __init__(self, **kwargs):
            made.append(kwargs["total"])
            self.n = 0

        def update(self, k):
            self.n += k

        def close(self):
            made.append(self.n)

    outs = llm.generate(["hi", "ho", "ha"], SamplingParams(max_tokens=2), use_tqdm=Bar)
    assert len(outs) == 3 and made == [3, 3]


def test_kv_budget_too_small_for_one_block_is_a_clear_error(tiny_model_dir):
    # it was a RuntimeError, so `meshserve generate --cpu-kv-cache-bytes 10` ended in a traceback
    with pytest.raises(InvalidArgumentError, match="raise cpu_kv_cache_bytes"):
        LLM(model=tiny_model_dir("llama"), cpu_kv_cache_bytes=10)


def test_cache_too_small_for_request_is_rejected(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("llama"), block_size=4, num_gpu_blocks_override=4)
    with pytest.raises(PromptTooLongError, match="never fit"):
        llm.generate({"prompt_token_ids": _ids(2, 14)}, SamplingParams(max_tokens=4), use_tqdm=False)
    # a pool of 16 tokens under a longer max_model_len: max_tokens left unset runs to the pool's end (every such
    # request was refused, blaming a max_tokens it never set); a prompt the pool cannot hold is named as such
    assert llm.engine.core_client.info.max_model_len > 16
    out = llm.generate({"prompt_token_ids": _ids(2, 10)}, SamplingParams(max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"
    with pytest.raises(PromptTooLongError, match="the KV cache holds 16"):
        llm.generate({"prompt_token_ids": _ids(2, 16)}, SamplingParams(max_tokens=None), use_tqdm=False)


def test_model_loading_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="not found"):
        LLM(model=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(model=str(tmp_path / "empty"))
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("llama"), broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="corrupt"):
        LLM(model=str(broken))
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(model=str(broken))
    other = tmp_path / "gpt2"
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10).save_pretrained(other)
    with pytest.raises(UnsupportedModelError, match="(?i)gpt2"):
        LLM(model=str(other))
    with pytest.raises(ModelLoadError, match="load-format dummy"):
        LLM(model="llama-3.1-8b")


def test_sharded_checkpoint_loads(tmp_path, tiny_model_dir):
    from tests.conftest import make_tiny_checkpoint

    sharded = make_tiny_checkpoint(str(tmp_path / "sharded"), "llama", max_shard_size="100KB")
    import os

    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    a = LLM(model=sharded).generate({"prompt_token_ids": [5, 6, 7]},
                                    SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    b = LLM(model=tiny_model_dir("llama")).generate({"prompt_token_ids": [5, 6, 7]},
                                                    SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                                                    use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_dummy_preset_runs_without_files():
    llm = LLM(model="smollm2-135m", load_format="dummy", max_model_len=64, num_gpu_blocks_override=8)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=3, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
    assert llm.get_tokenizer() is None


def test_async_streaming_and_abort_frees_blocks(tiny_model_dir):
    allm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model_dir("llama"), block_size=4))
    engine = allm.engine  # the core, in its thread

    async def main():
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        seen = []
        async for out in allm.generate({"prompt_token_ids": _ids(3, 9)}, params, "a"):
            seen.append(list(out.outputs[0].token_ids))
        assert len(seen[-1]) == 8 and seen == sorted(seen, key=len)  # cumulative, growing
        assert all(seen[i] == seen[-1][: len(seen[i])] for i in range(len(seen)))

        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        gen = allm.generate({"prompt_token_ids": _ids(4, 9)}, long, "b")
        await gen.__anext__()
        await gen.aclose()  # the client went away
        for _ in range(50):
            if await allm.call(lambda: not engine.has_unfinished_requests()):
                break
            await asyncio.sleep(0.01)
        assert await allm.call(lambda: engine.scheduler.block_manager.usage) == 0.0

        with pytest.raises(InvalidArgumentError):
            async for _ in allm.generate({"prompt_token_ids": []}, params, "c"):
                pass

    try:
        asyncio.run(main())
    finally:
        allm.shutdown()


def test_batch_tensors_start_16_byte_aligned(llm):
    """Triton specialises on pointer alignment: odd offsets into the packed batch buffer would compile
    extra kernel variants mid-serving. Every per-step tensor must start on a 16-byte boundary."""
    from meshserve.engine.scheduler_output import ScheduledSequence

    runner = llm.engine.runner
    seqs = [ScheduledSequence(seq_id=str(i), token_ids=_ids(i, n), num_computed_tokens=0,
                              block_table=list(range(i * 8, i * 8 + -(-n // 4))), params=None, do_sample=False)
            for i, n in enumerate([3, 5, 1])]  # odd token and sequence counts
    input_ids, positions, meta = runner._prepare(seqs)
    tensors = [input_ids, positions, meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables]
    assert all(t.data_ptr() % 16 == 0 for t in tensors)
    assert input_ids.tolist() == _ids(0, 3) + _ids(1, 5) + _ids(2, 1)
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]
    assert meta.query_start_loc.tolist() == [0, 3, 8, 9]
    assert meta.seq_lens.tolist() == [3, 5, 1]
    assert meta.block_tables.tolist() == [[0, 0], [8, 9], [16, 0]]
    assert meta.slot_mapping.tolist() == [0, 1, 2, 32, 33, 34, 35, 36, 64]


def test_logit_bias_forces_and_bans_tokens(llm):
    prompt = {"prompt_token_ids": _ids(7, 9)}
    forced = llm.generate(prompt, SamplingParams(temperature=0.8, seed=1, max_tokens=6, ignore_eos=True,
                                                 logit_bias={42: 100.0}), use_tqdm=False)[0].outputs[0]
    assert forced.token_ids == [42] * 6
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    ban = {t: -100.0 for t in free.token_ids}
    banned = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias=ban),
                          use_tqdm=False)[0].outputs[0]
    assert not set(banned.token_ids) & set(free.token_ids)
    with pytest.raises(InvalidArgumentError, match="logit_bias"):
        llm.generate(prompt, SamplingParams(logit_bias={VOCAB + 5: 1.0}), use_tqdm=False)
