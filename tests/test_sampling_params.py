"""SamplingParams: vLLM's defaults and names, and a clear error naming the parameter for each bad value."""

import pytest

from meshserve import SamplingParams
from meshserve.errors import InvalidArgumentError


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 16, 1.0, 1.0, 0, 0.0)
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos and p.skip_special_tokens


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(top_k=-1).top_k == 0 and SamplingParams(top_k=0).top_k == 0  # both "off", as in vLLM
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(presence_penalty=0.5).uses_penalties and not SamplingParams().uses_penalties


@pytest.mark.parametrize("kwargs,param", [
    (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-5), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(top_k=-100), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(seed="x"), "seed"), (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(logprobs=-1), "logprobs"), (dict(logprobs=100), "logprobs"), (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(allowed_token_ids=[3, -1]), "allowed_token_ids"),
    (dict(bad_words=["ok", "  "]), "bad_words"), (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(truncate_prompt_tokens=-2), "truncate_prompt_tokens"),
])
def test_invalid_values_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidArgumentError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


@pytest.mark.parametrize("kwargs,param", [
    # wrong types: each was a bare TypeError from a comparison or list() ('0.5' >= 0.0, 'int' is not iterable)
    (dict(temperature="0.5"), "temperature"), (dict(temperature=None), "temperature"), (dict(top_p="1"), "top_p"),
    (dict(min_p=None), "min_p"), (dict(repetition_penalty=None), "repetition_penalty"),
    (dict(presence_penalty="0"), "presence_penalty"), (dict(frequency_penalty=[0]), "frequency_penalty"),
    (dict(n=True), "n"), (dict(stop=5), "stop"), (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids"), (dict(bad_words=5), "bad_words"),
    (dict(logit_bias=[1, 2]), "logit_bias"), (dict(allowed_token_ids="abc"), "allowed_token_ids"),
    (dict(structured_outputs={"jsn": {}}), "structured_outputs"),
])
def test_values_of_the_wrong_type_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidArgumentError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_collections_of_any_kind_are_taken_as_lists():
    p = SamplingParams(stop=("a", "b"), stop_token_ids=(1, 2), allowed_token_ids=range(3), bad_words=("x",))
    assert (p.stop, p.stop_token_ids, p.allowed_token_ids, p.bad_words) == (["a", "b"], [1, 2], [0, 1, 2], ["x"])
    assert SamplingParams(temperature=1, top_p=1).temperature == 1  # integers are numbers


def test_from_defaults_given_fields_win_then_the_models_then_our_own():
    model = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 64}
    p = SamplingParams.from_defaults(model, temperature=None, top_p=0.5, top_k=None, seed=3)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed) == (0.6, 0.5, 0, 64, 3)
    assert SamplingParams.from_defaults(model, temperature=0.0).temperature == 0.0  # 0 is given, not unset
    assert SamplingParams.from_defaults(None) == SamplingParams()
    with pytest.raises(InvalidArgumentError, match="temperature"):
        SamplingParams.from_defaults({"temperature": -1.0})


def test_token_masks_and_history_are_only_asked_for_when_used():
    plain = SamplingParams()
    assert not plain.uses_token_masks and not plain.reads_output_history and plain.bad_words is None
    assert SamplingParams(allowed_token_ids=[1]).uses_token_masks
    assert SamplingParams(bad_words=[]).bad_words is None  # vLLM's default, asking for nothing
    assert SamplingParams(bad_words="no").bad_words == ["no"]  # one word, not its letters
    one, two = SamplingParams(), SamplingParams()
    one._bad_words_token_ids, two._bad_words_token_ids = [[7]], [[7], [3, 4]]
    # a one-token word is banned at every step; a longer one needs the output so far
    assert one.uses_token_masks and not one.reads_output_history and two.reads_output_history
    assert SamplingParams(truncate_prompt_tokens=-1).truncate_prompt_tokens == -1


@pytest.mark.parametrize("kwargs,param", [
    # vLLM's _verify_args: temperature and repetition_penalty must be finite; integers are not booleans
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"), (dict(max_tokens=True), "max_tokens"),
    (dict(min_tokens=1.5), "min_tokens"), (dict(top_k=True), "top_k"), (dict(seed=1.5), "seed"),
    (dict(stop="x", detokenize=False), "stop"), (dict(detokenize="no"), "detokenize"),
    (dict(extra_args=[1]), "extra_args"),
])
def test_vllm_refusals(kwargs, param):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_vllm_normalisations(caplog):
    assert SamplingParams(seed=-1).seed is None  # vLLM's "no seed"
    assert (SamplingParams(logprobs=True).logprobs, SamplingParams(prompt_logprobs=True).prompt_logprobs) == (1, 1)
    assert SamplingParams(stop_token_ids=[7, 3, 7]).stop_token_ids == [7, 3]
    with caplog.at_level("WARNING", logger="meshserve.sampling"):
        assert SamplingParams(temperature=1e-3).temperature == 0.01  # vLLM's floor against inf / nan
    assert "raised to 0.01" in caplog.text
    assert SamplingParams(temperature=0).temperature == 0 and SamplingParams(temperature=0.01).temperature == 0.01
    p = SamplingParams(extra_args={"plugin": 1})
    assert p.extra_args == {"plugin": 1} and p.detokenize and not SamplingParams(detokenize=False).detokenize


def test_from_optional_as_vllm():
    p = SamplingParams.from_optional(n=None, temperature=None, top_p=None, presence_penalty=None,
                                     frequency_penalty=None, repetition_penalty=None, max_tokens=None,
                                     logit_bias={"5": 150, 7: -3.0, "9": -200})
    assert (p.n, p.temperature, p.top_p, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == \
        (1, 1.0, 1.0, 0.0, 0.0, 1.0)
    assert p.max_tokens is None and p.logit_bias == {5: 100.0, 7: -3.0, 9: -100.0}
    assert SamplingParams.from_optional(temperature=0.5, max_tokens=8) == SamplingParams(temperature=0.5, max_tokens=8)
    with pytest.raises(ValueError, match="logit_bias.*'abc'"):
        SamplingParams.from_optional(logit_bias={"abc": 1.0})
    with pytest.raises(TypeError):  # a misspelled field is a TypeError, as vLLM's
        SamplingParams.from_optional(temprature=0.5)


def test_clone_is_independent():
    p = SamplingParams(stop=["a"], stop_token_ids=[3], logit_bias={1: 2.0}, structured_outputs={"regex": "a+"})
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("b")
    q.stop_token_ids.append(4)
    q.logit_bias[2] = 1.0
    assert (p.stop, p.stop_token_ids, p.logit_bias) == (["a"], [3], {1: 2.0})
    assert q.structured_outputs is not p.structured_outputs
