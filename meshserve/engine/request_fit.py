"""Whether a request can ever run: the one check both the front end (before sending) and the scheduler use."""

from __future__ import annotations

from meshserve.errors import PromptTooLongError


def check_request_fits(num_prompt_tokens: int, max_tokens: int, *, max_model_len: int, capacity_tokens: int,
                       enable_chunked_prefill: bool, max_num_batched_tokens: int) -> None:
    """Raise PromptTooLongError for a request too long for the model, the whole KV pool, or (without chunked
    prefill) one step's token budget."""
    total = num_prompt_tokens + max_tokens
    if total > max_model_len:
        raise PromptTooLongError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
            f"max_model_len ({max_model_len})", param="max_tokens")
    if total > capacity_tokens:
        raise PromptTooLongError(
            f"prompt + max_tokens = {total} tokens can never fit the KV cache ({capacity_tokens} tokens)",
            param="max_tokens")
    if not enable_chunked_prefill and num_prompt_tokens > max_num_batched_tokens:
        raise PromptTooLongError(
            f"prompt ({num_prompt_tokens} tokens) exceeds max_num_batched_tokens "
            f"({max_num_batched_tokens}) with chunked prefill disabled", param="prompt")
