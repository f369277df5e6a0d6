"""`meshserve bench tokenizer`: a word-level tokenizer over a whole vocabulary, for dummy-weight models.

Dummy-weight presets have no tokenizer, so benchmarks on them skip detokenization, which real models pay
on every token. This writes one of the preset's vocabulary size ("w17" is id 17, words joined by spaces):
`meshserve serve llama-3.1-8b --load-format dummy --tokenizer DIR` then streams text as a real model does.
"""

from __future__ import annotations

import argparse

from meshserve.cli_paths import check_output_folder
from meshserve.cli_types import positive_int
from meshserve.errors import InvalidArgumentError


def _vocab_size(text: str) -> int:
    """At least the three special tokens and one word."""
    value = positive_int(text)
    if value < 4:
        raise argparse.ArgumentTypeError(f"must be >= 4 (<unk>, <s>, </s> and a word), got {value}")
    return value


def write_word_tokenizer(path: str, vocab_size: int) -> str:
    """Save a transformers fast tokenizer with vocab_size entries (<unk>, <s>, </s>, then w3, w4, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, as a real decoder would
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return path


def _cmd(ns: argparse.Namespace) -> int:
    from meshserve.models.presets import find_preset, preset_config, preset_names

    check_output_folder(ns.output_dir, "output_dir")  # transformers only logs a file in the way, saving nothing
    if ns.vocab_size is None and find_preset(ns.model) is None:
        raise InvalidArgumentError(f"--model {ns.model!r} is not a preset ({', '.join(preset_names())}); or pass "
                                   "--vocab-size", param="model")
    vocab = ns.vocab_size or preset_config(ns.model).vocab_size
    print(f"word-level tokenizer of {vocab} tokens in {write_word_tokenizer(ns.output_dir, vocab)}")
    return 0


def add_tokenizer_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("tokenizer", help="write a word-level tokenizer of a preset's vocabulary size")
    p.add_argument("output_dir")
    p.add_argument("--model", default="llama-3.1-8b", help="preset whose vocab_size to use")
    p.add_argument("--vocab-size", type=_vocab_size, default=None, help="instead of the preset's")
    p.set_defaults(func=_cmd)
