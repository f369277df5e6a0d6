"""Process-group state seen by the layers and the model runner: which TP rank and PP stage this process is.

Ranks are laid out TP-inner: rank = pp_rank * tp_size + tp_rank, so a TP group is a block of consecutive
ranks (inside one node, over NVLink) and PP stages are spread across nodes. A single process is rank 0 of a
world of one, and every collective below is then an identity.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import sys
import threading
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class ParallelState:
    """This process's place in the world (global rank, TP rank, PP stage) and the groups it talks over.

    The default instance is a world of one; init_parallel_state replaces it once per process.
    """

    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: object | None = None  # device collectives inside the TP group (NCCL or gloo)
    cpu_group: object | None = None  # gloo over all ranks, for pickled control messages
    # gloo over all ranks, only for rank 0's calls to the workers (engine/worker.py): a worker waits there for
    # as long as the engine is idle, so its timeout is IDLE_WAIT, not the collectives' (an idle TP/PP server
    # lost its workers after --distributed-timeout-s); a driver that dies closes its sockets, which ends the
    # wait, and one whose node vanishes stops its keepalives, which the worker's watchdog notices
    # (distributed/call_liveness.py)
    call_group: object | None = None
    device_group: object | None = None  # the default group (NCCL on GPU), for point-to-point activations
    # gloo over all ranks, only for the last stage's sampled tokens going back to rank 0 (pipeline parallel):
    # apart from cpu_group so rank 0 can receive them while it broadcasts the next steps; rank 0's receiving
    # thread waits there while the engine idles, so its timeout is IDLE_WAIT too (an idle PP server died after
    # --distributed-timeout-s); a step's wait for its result is bounded by its reader (next_stage_result)
    token_group: object | None = None
    # the device backend between the last stage and the first, for the sampled ids the first stage's next step
    # takes as inputs (ParallelConfig.pp_token_handoff): its own communicator, apart from the activations' one
    handoff_group: object | None = None
    pp_layer_partition: list[int] | None = None  # layers per stage; None = even split
    # the small-message all-reduce (distributed/symm_mem_all_reduce.py); None: NCCL for every size
    tp_fast_all_reduce: object | None = None
    # MoE experts spread over the TP group's ranks (attention stays tensor-parallel); see layers/fused_moe.py
    expert_parallel: bool = False

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of this process's TP peer in stage pp_rank."""
        return pp_rank * self.tp_size + self.tp_rank

    @property
    def sampler_rank(self) -> int:
        """The rank that samples and reports tokens: TP rank 0 of the last stage."""
        return (self.pp_size - 1) * self.tp_size


_STATE = ParallelState()
# call_group's and token_group's timeout: how long a rank may wait for work
IDLE_WAIT = datetime.timedelta(days=365)


def get_parallel_state() -> ParallelState:
    return _STATE


def get_tp_rank() -> int:
    return _STATE.tp_rank


def get_tp_size() -> int:
    return _STATE.tp_size


def init_parallel_state(tp_size: int, pp_size: int, rank: int, master_addr: str, master_port: int,
                        backend: str, timeout_s: float = 60.0,
                        pp_layer_partition: list[int] | None = None, expert_parallel: bool = False,
                        token_handoff: bool = False) -> ParallelState:
    """Join the torch.distributed world of tp_size * pp_size ranks and build the TP groups (token_handoff: and
    the last stage's communicator to the first, ParallelConfig.pp_token_handoff; PP > 1, TP = 1)."""
    global _STATE
    world = tp_size * pp_size
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                            world_size=world, rank=rank, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    call_group = dist.new_group(backend="gloo", timeout=IDLE_WAIT)
    token_group = dist.new_group(backend="gloo", timeout=IDLE_WAIT) if pp_size > 1 else None
    handoff = pp_size > 1 and tp_size == 1 and token_handoff
    handoff_group = dist.new_group(backend=backend, timeout=timeout) if handoff else None
    tp_group = None
    for stage in range(pp_size):  # every rank must create every group, in the same order
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks, backend=backend, timeout=timeout)
        if rank in ranks:
            tp_group = group
    _STATE = ParallelState(rank=rank, world_size=world, tp_rank=rank % tp_size, tp_size=tp_size,
                           pp_rank=rank // tp_size, pp_size=pp_size, tp_group=tp_group, cpu_group=cpu_group,
                           call_group=call_group,
                           device_group=dist.group.WORLD, token_group=token_group, handoff_group=handoff_group,
                           pp_layer_partition=pp_layer_partition,
                           expert_parallel=expert_parallel)
    logger.info("rank %d/%d: tp %d/%d, pp %d/%d (%s)", rank, world, _STATE.tp_rank, tp_size, _STATE.pp_rank,
                pp_size, backend)
    return _STATE


def enable_fast_all_reduce(device: torch.device, dtype: torch.dtype) -> bool:
    """Set up the one-shot symmetric-memory all-reduce for this rank's TP group (GPU, TP > 1); every rank
    of the group must call it together. False where it is unavailable (NCCL then serves every size)."""
    if _STATE.tp_size == 1 or device.type != "cuda":
        return False
    from meshserve.distributed.symm_mem_all_reduce import try_symm_mem_all_reduce

    _STATE.tp_fast_all_reduce = try_symm_mem_all_reduce(_STATE.tp_group, device, dtype)
    return _STATE.tp_fast_all_reduce is not None


def tensor_parallel_forward():
    """Context for one model forward (eager or captured): the fast all-reduce's per-forward state."""
    if _STATE.tp_fast_all_reduce is None:
        return contextlib.nullcontext()
    return _STATE.tp_fast_all_reduce.forward_scope()


def destroy_parallel_state(timeout_s: float = 10.0) -> None:
    """Leave the torch.distributed world. On NCCL the communicators are aborted first: a graceful destroy
    waits for peers, and a peer that already left (or graphs holding captured collectives) kept rank 0
    waiting forever on two H200s. Bounded either way: past timeout_s the process moves on (it is leaving)."""
    global _STATE
    _STATE.tp_fast_all_reduce = None
    if dist.is_initialized():
        done = threading.Event()
        # the thread below would default to GPU 0: name this rank's device here
        device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

        def teardown():
            try:
                if dist.get_backend() == "nccl":
                    if device is not None:
                        torch.cuda.synchronize(device)
                    dist.distributed_c10d._abort_process_group()
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001, S110  (a dead peer can make teardown fail; the process is leaving)
                pass
            done.set()

        thread = threading.Thread(target=teardown, name="meshserve-dist-teardown", daemon=True)
        thread.start()
        if not done.wait(timeout_s):
            frame = sys._current_frames().get(thread.ident)
            where = "".join(traceback.format_stack(frame)[-2:]).strip() if frame is not None else "?"
            logger.warning("torch.distributed teardown did not finish in %.0f s; left to process exit. "
                           "It waits in:\n%s", timeout_s, where)
    _STATE = ParallelState()


def tensor_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the tensor-parallel group: the one-shot kernel for small messages where it is set up,
    else NCCL in place. Use the returned tensor."""
    if _STATE.tp_size == 1:
        return x
    fast = _STATE.tp_fast_all_reduce
    if fast is not None and fast.can_reduce(x):
        return fast.all_reduce(x)
    dist.all_reduce(x, group=_STATE.tp_group)
    return x


def tensor_parallel_all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                                        eps: float, push: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The TP sum of x, plus residual, RMS-normed, in one kernel (distributed/symm_mem_all_reduce.py; push:
    the variant that writes into the peers' buffers): (normed, sum + residual), or None where that kernel does
    not serve (no one-shot all-reduce set up, a message over its size, shapes or dtypes it lacks); every rank
    decides alike from the same shapes."""
    fast = _STATE.tp_fast_all_reduce
    if _STATE.tp_size == 1 or fast is None or not fast.can_fuse_rms_norm(x, residual, weight, push):
        return None
    return fast.all_reduce_rms_norm(x, residual, weight, eps, push)


def tensor_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate x along dim over the tensor-parallel group."""
    if _STATE.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_STATE.tp_group)
    return torch.cat(parts, dim=dim)
