"""host_lists.to_device: small host lists as tensors (CPU here; the pinned copy is the GPU tests')."""

import torch

from meshserve.host_lists import pack_int64_ids, to_device


def test_int_lists_and_others_become_the_same_tensors_as_torch_tensor():
    cpu = torch.device("cpu")
    for data, dtype in [([5, 0, 2**40, -3], torch.int64), ([True, 2], torch.int64), ([[1, 2], [3, 4]], torch.int64),
                        ([1.5, 2.0], torch.float32), ([1, 2.5], torch.int64), ([], torch.int64)]:
        got = to_device(data, cpu, dtype)
        assert got.dtype == dtype and torch.equal(got, torch.tensor(data, dtype=dtype)), data


def test_ids_packed_into_the_front_of_a_buffer():
    out = torch.full((6,), -1, dtype=torch.int64)
    pack_int64_ids([7, 0, 2**40], out)
    assert out.tolist() == [7, 0, 2**40, -1, -1, -1]
