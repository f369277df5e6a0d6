"""The mixture-of-experts fields of an HF config, read the same way for every family (no torch: the argument
checks and the planner read it before anything heavy loads).

Mixtral names its expert count `num_local_experts`, Qwen2/3-MoE `num_experts`, DeepSeek `n_routed_experts`
(transformers maps it to one of the two); Qwen's `decoder_sparse_step` and
`mlp_only_layers` say which layers are sparse (the others keep a dense MLP of `intermediate_size`).
"""

from __future__ import annotations

from meshserve.errors import InvalidArgumentError


def num_experts(hf_config) -> int:
    """Routed experts per MoE layer (0 for a dense model)."""
    return int(getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None) or 0)


def expert_intermediate_size(hf_config) -> int:
    """Width of one routed expert: Qwen's moe_intermediate_size, else (Mixtral) intermediate_size."""
    return int(getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size)


def is_sparse_layer(hf_config, layer: int) -> bool:
    """Whether decoder layer `layer` has routed experts (HF's rule: not in mlp_only_layers and (layer + 1)
    divisible by decoder_sparse_step; DeepSeek: not among the first_k_dense_replace dense layers)."""
    if num_experts(hf_config) == 0 or layer < int(getattr(hf_config, "first_k_dense_replace", None) or 0):
        return False
    step = int(getattr(hf_config, "decoder_sparse_step", None) or 1)
    dense_only = getattr(hf_config, "mlp_only_layers", None) or []
    return layer not in dense_only and (layer + 1) % step == 0


def check_moe_split(hf_config, tp: int, expert_parallel: bool) -> None:
    """Reject an expert layout the shapes cannot take: with expert parallelism the experts must divide over
    the TP ranks; without it each expert's width must."""
    experts = num_experts(hf_config)
    if experts == 0 or tp == 1:
        return
    if expert_parallel:
        if experts % tp:
            raise InvalidArgumentError(f"enable_expert_parallel: {experts} experts do not divide evenly over "
                                       f"tensor_parallel_size {tp}", param="enable_expert_parallel")
    elif expert_intermediate_size(hf_config) % tp:
        raise InvalidArgumentError(f"tensor_parallel_size {tp}: expert width {expert_intermediate_size(hf_config)} "
                                   "is not divisible by it (try --enable-expert-parallel)",
                                   param="tensor_parallel_size")
