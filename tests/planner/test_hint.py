"""No fit comes with a hint that works: the largest --max-model-len that fits, or the GPUs that would."""

import re

import pytest

from meshserve.cli import main
from meshserve.errors import InvalidArgumentError
from meshserve.planner.auto import choose_layout_for_visible_gpus
from meshserve.planner.hardware import get_gpu
from meshserve.planner.model import load_model
from meshserve.planner.plan import PlanRequest, make_plan


def plan(model, gpu, num_gpus=1, **kw):
    return make_plan(PlanRequest(model=load_model(model), gpu=get_gpu(gpu), num_gpus=num_gpus, **kw))


def test_8b_on_l4_hints_the_largest_max_model_len_that_fits():
    result = plan("llama-3.1-8b", "L4")
    assert result.best is None
    length = int(re.search(r"--max-model-len (\d+) fits", result.hint).group(1))
    assert plan("llama-3.1-8b", "L4", max_model_len=length).best is not None
    assert plan("llama-3.1-8b", "L4", max_model_len=length + 1024).best is None  # the largest, to 1,024
    gpus = int(re.search(r"--num-gpus (\d+) fits max_model_len 131,072", result.hint).group(1))
    assert plan("llama-3.1-8b", "L4", num_gpus=gpus).best is not None
    assert plan("llama-3.1-8b", "L4", num_gpus=gpus // 2).best is None


def test_405b_hints_more_gpus_when_weights_alone_do_not_fit():
    result = plan("llama-3.1-405b", "H100-SXM", num_gpus=8)
    assert "--max-model-len" not in result.hint  # no length helps: the weights exceed 8 GPUs
    assert "--num-gpus 16 --nodes 2 fits" in result.hint
    assert plan("llama-3.1-405b", "H100-SXM", num_gpus=16, nodes=2).best is not None


def test_a_fitting_plan_has_no_hint():
    assert plan("llama-3.1-8b", "H100-SXM").hint == ""


def test_cli_and_auto_show_the_hint(capsys):
    assert main(["plan", "llama-3.1-8b", "--gpu", "L4"]) == 1
    out = capsys.readouterr().out
    assert "no fit:" in out and "hint: --max-model-len 23552 fits" in out
    with pytest.raises(InvalidArgumentError, match="--max-model-len 23552") as e:
        choose_layout_for_visible_gpus("llama-3.1-8b", ["NVIDIA L4"])
    assert "\n" not in str(e.value)


def test_no_fit_at_any_length_or_gpu_count_still_says_what_to_do():
    """Past what doubling the GPUs (16 nodes) or shortening the context can hold, the report had no hint at all:
    now a narrower --dtype that fits (checked by planning it), else a line saying nothing fits and why."""
    from meshserve.models.presets import PRESETS
    from meshserve.planner.model import model_from_config

    base = {**PRESETS["llama-3.1-405b"], "max_position_embeddings": 8192}
    big = model_from_config({**base, "num_hidden_layers": 504}, name="big")  # 1.6 T parameters: 3.2 TB in bf16
    r = make_plan(PlanRequest(model=big, gpu=get_gpu("L4"), num_gpus=8))
    assert r.best is None and r.hint == "--dtype fp8 --num-gpus 128 --nodes 16 fits max_model_len 8,192 (TP=8×PP=16)"
    giant = model_from_config({**base, "num_hidden_layers": 20000}, name="giant")  # 64 T: 32 TB even in int4
    r = make_plan(PlanRequest(model=giant, gpu=get_gpu("H200"), num_gpus=8))
    assert r.best is None and r.hint.startswith("nothing fits on up to 128 H200 GPUs (16 nodes) at any "
                                                "--max-model-len or --dtype (int4 weights spread evenly over 128: ")
    assert "GB per GPU, 135.7 GB usable): plan a GPU with more memory" in r.hint
