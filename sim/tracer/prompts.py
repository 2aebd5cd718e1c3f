"""Split a text file into `prompts` prompts of exactly `prompt_tokens` tokens (deterministic).

The whole file (UTF-8) is tokenised once, without special tokens. With `N` tokens the stride is
`N // prompts`, and prompt `i` is the `prompt_tokens` tokens starting at `i * stride` (evenly
spread over the text, never overlapping). If the tokenizer has a BOS token, it is the first of
the `prompt_tokens` tokens of every prompt (and one fewer text token is taken).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sim.errors import UserError


@dataclass(frozen=True)
class Prompts:
    ids: np.ndarray  # [prompts, prompt_tokens] int64
    text_name: str
    text_sha256: str
    text_tokens: int  # tokens in the whole text
    stride: int
    bos: bool

    def describe(self) -> str:
        bos = "a BOS token then " if self.bos else ""
        return (
            f"text tokenised without special tokens ({self.text_tokens} tokens); prompt i = {bos}the "
            f"tokens starting at i * {self.stride} (stride = text tokens // prompts)"
        )


def read_text(path: str | Path) -> tuple[str, str]:
    """(text, sha256 of the file's bytes). UserError if missing, unreadable or empty."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file not found: {path}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"text file {p.name} is not UTF-8 (byte {err.start})") from None
    if not text.strip():
        raise UserError(f"text file {p.name} is empty")
    return text, hashlib.sha256(data).hexdigest()


def make_prompts(tokenizer: Any, path: str | Path, *, prompts: int, prompt_tokens: int) -> Prompts:
    if prompts < 1:
        raise UserError(f"prompts must be >= 1, got {prompts}")
    if prompt_tokens < 1:
        raise UserError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    text, sha = read_text(path)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    bos = getattr(tokenizer, "bos_token_id", None)
    take = prompt_tokens - (1 if bos is not None else 0)
    n = len(ids)
    stride = n // prompts
    if n == 0 or (take > 0 and stride < take):
        need = prompts * take
        raise UserError(
            f"text file {Path(path).name} is too short: {n} tokens, but prompts={prompts} x "
            f"prompt_tokens={prompt_tokens} needs {need}"
        )
    rows = [ids[i * stride : i * stride + take] for i in range(prompts)]
    out = np.stack(rows) if take > 0 else np.zeros((prompts, 0), dtype=np.int64)
    if bos is not None:
        out = np.concatenate([np.full((prompts, 1), bos, dtype=np.int64), out], axis=1)
    return Prompts(out, Path(path).name, sha, n, stride, bos is not None)
