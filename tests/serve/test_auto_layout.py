"""`serve --auto` picks the planner's layout for simulated GPU lists."""

import argparse

import pytest

from meshserve.errors import InvalidArgumentError
from meshserve.serve.auto_layout import apply_auto_layout, choose_auto_layout


@pytest.mark.parametrize("model,gpus,expected", [
    ("llama-3.1-8b", ["NVIDIA H100 80GB HBM3"], (1, 1, 1)),
    ("llama-3.1-8b", ["H100-SXM"] * 8, (1, 1, 8)),
    ("llama-3.1-70b", ["H100-SXM"] * 4, (4, 1, 1)),
    ("llama-3.1-405b", ["H200"] * 8, (8, 1, 1)),
])
def test_auto_layout_on_simulated_gpus(model, gpus, expected):
    choice = choose_auto_layout(model, gpus)
    assert (choice.tp, choice.pp, choice.dp) == expected
    assert choice.reason


def test_two_nodes_for_405b():
    choice = choose_auto_layout("llama-3.1-405b", ["H100-SXM"] * 8, nodes=2)
    assert (choice.tp, choice.pp) == (8, 2)


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(InvalidArgumentError):
        choose_auto_layout("llama-3.1-405b", ["H100-SXM"] * 8)


def test_apply_sets_the_flags(monkeypatch, capsys):
    monkeypatch.setenv("MESHSERVE_AUTO_GPUS", ",".join(["H100-SXM"] * 4))
    ns = argparse.Namespace(model="llama-3.1-70b", nnodes=1, max_model_len=None, tensor_parallel_size=1,
                            pipeline_parallel_size=1)
    apply_auto_layout(ns)
    assert (ns.tensor_parallel_size, ns.pipeline_parallel_size) == (4, 1)
    assert "TP=4" in capsys.readouterr().out
