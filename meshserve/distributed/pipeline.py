"""Pipeline-parallel helpers: which layers a stage owns, and passing activations between stages."""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshserve.distributed.parallel_state import get_parallel_state


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int,
                   partition: list[int] | None = None) -> tuple[int, int]:
    """[start, end) of the layers stage pp_rank owns: an even split (earlier stages take the remainder)
    or an explicit partition (layers per stage, summing to num_layers)."""
    if partition is not None:
        if len(partition) != pp_size or sum(partition) != num_layers or min(partition) < 1:
            raise ValueError(f"pp layer partition {partition} must give {pp_size} stages >= 1 layer "
                             f"summing to {num_layers}")
        start = sum(partition[:pp_rank])
        return start, start + partition[pp_rank]
    if num_layers < pp_size:
        raise ValueError(f"{num_layers} layers cannot be split over {pp_size} pipeline stages")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def send_activations(tensors: list[torch.Tensor]) -> list:
    """Send to the next stage without blocking; returns the work handles to wait on before reuse."""
    st = get_parallel_state()
    dst = st.stage_rank(st.pp_rank + 1)
    return [dist.isend(t.contiguous(), dst=dst, group=st.device_group) for t in tensors]


def recv_activations(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Receive from the previous stage into fresh buffers of the given shapes."""
    return recv_activations_into([torch.empty(s, dtype=dtype, device=device) for s in shapes])


def recv_activations_into(buffers: list[torch.Tensor]) -> list[torch.Tensor]:
    """Receive from the previous stage into the given contiguous buffers (e.g. a CUDA graph's static input).
    On NCCL the host does not wait: the receive is queued after the work already on the current stream
    (so it cannot overwrite a buffer an earlier replay still reads) and that stream waits for it."""
    st = get_parallel_state()
    src = st.stage_rank(st.pp_rank - 1)
    for t in buffers:
        dist.recv(t, src=src, group=st.device_group)
    return buffers
