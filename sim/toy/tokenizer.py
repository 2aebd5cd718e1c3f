"""A byte-level Hugging Face tokenizer built offline: token id == byte value (0..255).

It is a real `tokenizers` pipeline, so `AutoTokenizer.from_pretrained(checkpoint)` loads it like
any other checkpoint's:

    pre-tokenizer  ByteLevel(add_prefix_space=False, use_regex=False): every UTF-8 byte of the text
                   becomes one printable stand-in character (the GPT-2 byte <-> character table)
    model          BPE whose vocabulary is those 256 characters, the character for byte b at id b,
                   and no merges, so each byte stays one token
    decoder        ByteLevel: characters back to bytes, then UTF-8

There are no special tokens (no BOS/EOS/PAD): `tokenizer(text).input_ids == list(text.encode())`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def byte_to_char() -> dict[int, str]:
    """The GPT-2 byte-level table: printable Latin-1 bytes map to themselves, the other 68 bytes
    to code points 256, 257, ... in byte order (so every byte has a visible, unique character)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer(model_max_length: int | None = None) -> Any:
    """A `PreTrainedTokenizerFast` with ids 0..255 = bytes 0..255 (see the module docstring).

    `model_max_length` is the context the model was trained on (tokenizing longer text only warns).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in byte_to_char().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
        model_max_length=model_max_length,
    )


def save_tokenizer(folder: Path, model_max_length: int | None = None) -> None:
    """Write the tokenizer files (`tokenizer.json`, `tokenizer_config.json`) into `folder`."""
    build_tokenizer(model_max_length).save_pretrained(str(folder))
