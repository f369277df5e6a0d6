"""engine/cuda_graph.captured_us, the graph-replay timer of the tools' kernel timings (-m gpu)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_captured_us_times_the_captured_work_and_runs_it():
    from meshserve.engine.cuda_graph import captured_us

    a = torch.randn(1 << 26, device="cuda")  # 256 MiB
    b = torch.empty_like(a)
    small = captured_us(lambda: b[:1024].copy_(a[:1024]), 20)
    big = captured_us(lambda: b.copy_(a), 20)
    assert torch.equal(a, b)  # the captured copy ran
    assert 0 < small < big  # 512 MiB of traffic takes far longer than 8 KiB
    assert big > 512 * 2**20 / 10e12 * 1e6  # and no faster than 10 TB/s: the replays were timed
