"""A tiny tokenizer (and checkpoint) of a reasoning model: `<think>` and `</think>` are single added tokens,
not special (as in the Qwen3 and DeepSeek-R1 tokenizers), and the chat template closes an empty span in the
prompt when enable_thinking=False (Qwen3's template does the same)."""

from __future__ import annotations

from tests.conftest import VOCAB, _train_tokenizer, make_tiny_checkpoint

THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def reasoning_tokenizer(special: bool = False):
    """The tiny BPE tokenizer with the two tags added as single tokens (ids below the model's VOCAB)."""
    from tokenizers import AddedToken

    tok = _train_tokenizer(VOCAB - 8)
    tok.add_tokens([AddedToken("<think>", special=special, normalized=False),
                    AddedToken("</think>", special=special, normalized=False)], special_tokens=special)
    tok.chat_template = THINK_TEMPLATE
    assert max(tok.convert_tokens_to_ids(["<think>", "</think>"])) < VOCAB
    return tok


def make_reasoning_checkpoint(path: str, special: bool = False) -> str:
    """A tiny random llama checkpoint whose tokenizer is reasoning_tokenizer()."""
    make_tiny_checkpoint(path, "llama", with_tokenizer=False)
    reasoning_tokenizer(special).save_pretrained(path)
    return path
