"""Vocab-parallel token embedding and LM head: each TP rank holds a contiguous slice of the vocabulary."""

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.distributed.parallel_state import (
    get_tp_rank,
    get_tp_size,
    tensor_parallel_all_gather,
    tensor_parallel_all_reduce,
)
from meshserve.kernels.fused import linear
from meshserve.layers.backend_selection import PLAIN
from meshserve.layers.weight_utils import narrow_weight, weight_shape


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [vocab_start, vocab_end) live on this rank; other ids contribute zeros, then all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size = vocab_size
        self.num_per_rank = -(-vocab_size // self.tp_size)  # ceil: the last rank's slice is padded
        self.vocab_start = self.tp_rank * self.num_per_rank
        self.weight = nn.Parameter(torch.empty(self.num_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        vocab = weight_shape(loaded)[0]
        start = min(self.vocab_start, vocab)
        part = narrow_weight(loaded, 0, start, min(self.num_per_rank, vocab - start))
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def forward(self, input_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """The embedding rows; with reduce=False and TP, this rank's share (zeros outside its vocabulary) for a
        caller that all-reduces it itself."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mask = (local >= 0) & (local < self.num_per_rank)
        out = F.embedding(local.clamp(0, self.num_per_rank - 1), self.weight) * mask.unsqueeze(-1)
        return tensor_parallel_all_reduce(out) if reduce else out


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; ranks compute their slice and gather the whole."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool = False):
        super().__init__(vocab_size, hidden_size)
        self.bias = None
        self.kernels = PLAIN  # bound by the model runner: the GEMV serves batch-1 decode

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, gemv=self.kernels.gemv, skinny=self.kernels.skinny_gemv,
                        decode_gemm=self.kernels.decode_gemm)
        if self.tp_size > 1:
            logits = tensor_parallel_all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size]
