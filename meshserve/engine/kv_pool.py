"""KV pool sizing and allocation: how many blocks fit in this rank's memory, and the tensors that hold them."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from meshserve.config import EngineConfig, SchedulerConfig
from meshserve.engine.scheduler_output import ScheduledSequence
from meshserve.errors import InvalidArgumentError
from meshserve.layers.attention import Attention

logger = logging.getLogger(__name__)


class KVCachePool:
    """This rank's paged KV memory: one tensor per attention layer of its pipeline stage.

    Layout per layer: the layer's kv_cache_shape, [2, num_blocks, block_size, num_kv_heads, head_dim] (0 is K,
    1 is V) for attention layers, [1, num_blocks, block_size, 1, kv_lora_rank + rope dim] for MLA layers (one
    latent per token), in the selected KV cache dtype. The pool binds each tensor to its layer, which writes it through its backend; block ids
    (the block manager's) index dimension 1 of every layer alike.
    """

    def __init__(self, config: EngineConfig, layers: list[Attention], dtype: torch.dtype, device: torch.device):
        self.config = config
        self.layers = layers
        self.dtype = dtype
        self.device = device
        self.block_size = config.cache_config.block_size
        self.tensors: list[torch.Tensor] = []

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].num_kv_heads

    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return sum(math.prod(layer.kv_cache_shape(1, self.block_size)) for layer in self.layers) * elem

    def determine_num_blocks(self, profile_peak_memory: Callable[[], int],
                             per_block: int | None = None) -> int:
        """How many KV blocks the memory budget allows (or the override). On a GPU the budget is what
        gpu_memory_utilization leaves after the peak of a largest step (profile_peak_memory, weights
        included) and memory held outside torch; on a CPU it is cpu_kv_cache_bytes, capped at what
        every sequence at full length could use. per_block: the bytes one block id costs (default this pool's;
        more where a draft model's pool shares the ids and the budget)."""
        cc, sc = self.config.cache_config, self.config.scheduler_config
        if cc.num_gpu_blocks_override is not None:
            return cc.num_gpu_blocks_override
        per_block = per_block or self.bytes_per_block()
        if self.device.type == "cuda":
            peak = profile_peak_memory()
            free, total = torch.cuda.mem_get_info(self.device)
            # memory held outside torch's allocator (CUDA context, NCCL, other processes) stays reserved
            non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
            budget = int(total * cc.gpu_memory_utilization) - peak - max(non_torch, 0)
            logger.info("GPU memory: total %.1f GiB x %.2f; weights + peak activations %.2f GiB; "
                        "outside torch %.2f GiB; KV budget %.2f GiB", total / 2**30, cc.gpu_memory_utilization,
                        peak / 2**30, non_torch / 2**30, budget / 2**30)
        else:
            budget = cc.cpu_kv_cache_bytes
            # a CPU pool never needs more than every sequence at full length (max_num_seqs per step in
            # flight), with a draft model's lookahead slots past it (without them the longest requests hung)
            spec = self.config.speculative_config
            full_len = sc.max_model_len + (spec.num_lookahead_tokens if spec is not None else 0)
            needed = sc.max_running * (-(-full_len // self.block_size)) * per_block
            budget = min(budget, needed)
        num_blocks = budget // per_block
        if num_blocks < 1:  # a setting's fault, so the CLI's one-line error rather than a traceback
            knob = "gpu_memory_utilization" if self.device.type == "cuda" else "cpu_kv_cache_bytes"
            raise InvalidArgumentError(f"no memory left for the KV cache (budget {budget} bytes, {per_block} bytes "
                                       f"per block): raise {knob}", param=knob)
        return int(num_blocks)

    def allocate(self, num_blocks: int) -> None:
        """Zeroed cache tensors of num_blocks blocks, bound to their layers."""
        self.tensors = []
        for layer in self.layers:
            shape = layer.kv_cache_shape(num_blocks, self.block_size)
            layer.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.tensors.append(layer.kv_cache)

    def release(self) -> None:
        """Unbind and drop the cache tensors (after the profiling step)."""
        for layer in self.layers:
            layer.kv_cache = None
        self.tensors = []


def largest_step(sc: SchedulerConfig, block_size: int) -> list[ScheduledSequence]:
    """The largest step the scheduler can make, for profiling: max_num_batched_tokens of prefill spread over
    up to max_num_seqs sequences, each on its own consecutive blocks from block 0."""
    tokens = min(sc.max_num_batched_tokens, sc.max_num_seqs * sc.max_model_len)
    num_seqs = min(sc.max_num_seqs, tokens)
    per_seq = [tokens // num_seqs + (1 if i < tokens % num_seqs else 0) for i in range(num_seqs)]
    blocks_per_seq = [-(-n // block_size) for n in per_seq]
    scheduled, next_block = [], 0
    for i, (n, nb) in enumerate(zip(per_seq, blocks_per_seq)):
        table = list(range(next_block, next_block + nb))
        next_block += nb
        scheduled.append(ScheduledSequence(seq_id=f"profile{i}", token_ids=[0] * n, num_computed_tokens=0,
                                           block_table=table, params=None, do_sample=False))
    return scheduled
