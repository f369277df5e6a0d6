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
