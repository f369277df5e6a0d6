"""host_lists.to_device: small host lists as tensors (CPU here; the pinned copy is the GPU tests')."""

import torch

from meshserve.host_lists import to_device


def test_int_lists_and_others_become_the_same_tensors_as_torch_tensor():
    cpu = torch.device("cpu")
    for data, dtype in [([5, 0, 2**40, -3], torch.int64), ([True, 2], torch.int64), ([[1, 2], [3, 4]], torch.int64),
                        ([1.5, 2.0], torch.float32), ([1, 2.5], torch.int64), ([], torch.int64)]:
        got = to_device(data, cpu, dtype)
        assert got.dtype == dtype and torch.equal(got, torch.tensor(data, dtype=dtype)), data
