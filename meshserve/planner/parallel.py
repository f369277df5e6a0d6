"""One parallel layout: tensor × pipeline × data parallel sizes, and expert parallelism for MoE."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Layout:
    """tp GPUs share each layer (inside a node), pp stages hold contiguous layer slices (one node each),
    dp independent replicas. ep > 1 spreads whole routed experts over the tp × dp GPUs of a stage (vLLM's
    --enable-expert-parallel) instead of slicing every expert tp ways; ep == 1 means off."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def gpus_per_replica(self) -> int:
        return self.tp * self.pp

    @property
    def label(self) -> str:
        parts = [f"TP={self.tp}"]
        if self.pp > 1:
            parts.append(f"PP={self.pp}")
        if self.dp > 1:
            parts.append(f"DP={self.dp}")
        if self.ep > 1:
            parts.append(f"EP={self.ep}")
        return "×".join(parts)

    def __str__(self) -> str:
        return self.label
