"""EngineArgs: vLLM's spellings of its arguments, and a clear error naming the argument for a value of the wrong
type (each was a bare TypeError from a comparison, or ran: max_num_seqs=1.5)."""

import pytest

from meshserve.config import EngineArgs
from meshserve.errors import InvalidArgumentError


def test_vllm_spellings():
    import torch

    assert EngineArgs(dtype="half").dtype == "float16" and EngineArgs(dtype="float").dtype == "float32"
    assert EngineArgs(dtype=torch.bfloat16).dtype == "bfloat16"
    # None for a plain-valued argument is its default, as vLLM's optional arguments take it
    args = EngineArgs(seed=None, block_size=None, max_num_seqs=None, enable_prefix_caching=None)
    assert (args.seed, args.block_size, args.max_num_seqs, args.enable_prefix_caching) == (0, 16, 256, True)
    args.validate()
    EngineArgs(enforce_eager=1, gpu_memory_utilization=1).validate()  # 1 is True, and a number
    assert EngineArgs(cpu_kv_cache_bytes=2e9).cpu_kv_cache_bytes == 2_000_000_000  # a whole float is an integer


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_model_len="64"), "max_model_len"), (dict(gpu_memory_utilization="0.5"), "gpu_memory_utilization"),
    (dict(seed="x"), "seed"), (dict(seed=True), "seed"), (dict(max_num_seqs=1.5), "max_num_seqs"),
    (dict(enforce_eager="no"), "enforce_eager"), (dict(dtype=5), "dtype"),
])
def test_wrong_types_name_the_argument(kwargs, param):
    with pytest.raises(InvalidArgumentError) as e:
        EngineArgs(**kwargs).validate()
    assert e.value.param == param and param in str(e.value)
