"""A byte corpus from text that every Python install has offline.

Documents, in a deterministic order:
  1. every `.py` file under the standard library (`sysconfig.get_paths()["stdlib"]`), sorted by
     POSIX relative path, skipping `site-packages`, test folders, `__pycache__`, the `encodings`
     package (mostly machine-generated code-page tables) and `pydoc_data/topics.py` (its text is
     taken from item 2 instead, so it is not counted twice);
  2. each entry of `pydoc_data.topics.topics` (the interpreter's built-in help text, sorted by
     topic name), named `pydoc_data.topics/<topic>`.

Split: a document is held out when `sha256(name) mod 100 < heldout_percent` (5 by default), so the
split depends only on a document's name, not on which other files exist. Each split's stream is
its documents' bytes in order, each followed by one blank line (`b"\n\n"`).

The standard library differs between Python versions, so the corpus does too: `Corpus` records the
Python version and a sha256 of each stream so that a rerun can be checked.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from sim import atomic
from sim.errors import UserError

#: folder names (anywhere in the relative path) whose files are not used
SKIP_PARTS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}
)
#: files (relative POSIX paths) not used
SKIP_FILES = frozenset({"pydoc_data/topics.py"})
SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Document:
    name: str  # relative POSIX path of a stdlib file, or `pydoc_data.topics/<topic>`
    data: bytes


@dataclass(frozen=True)
class Corpus:
    """Train and held-out byte streams plus what is needed to check a rerun."""

    train: bytes
    heldout: bytes
    train_docs: tuple[str, ...]
    heldout_docs: tuple[str, ...]
    python_version: str
    heldout_percent: int

    @property
    def train_sha256(self) -> str:
        return hashlib.sha256(self.train).hexdigest()

    @property
    def heldout_sha256(self) -> str:
        return hashlib.sha256(self.heldout).hexdigest()

    def describe(self) -> str:
        """One paragraph for the model card."""
        return (
            f"Python {self.python_version} standard library `.py` sources plus `pydoc_data.topics` help "
            f"text: {len(self.train_docs)} training documents ({len(self.train):,} bytes, sha256 "
            f"`{self.train_sha256}`) and {len(self.heldout_docs)} held-out documents "
            f"({len(self.heldout):,} bytes, sha256 `{self.heldout_sha256}`); held out when "
            f"sha256(document name) mod 100 < {self.heldout_percent}."
        )


def stdlib_documents(stdlib: Path | None = None) -> list[Document]:
    """The `.py` files of the standard library, sorted by relative POSIX path."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(f"standard library folder not found: {root}")
    docs = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        name = rel.as_posix()
        if SKIP_PARTS.intersection(rel.parts[:-1]) or name in SKIP_FILES or not path.is_file():
            continue
        docs.append(Document(name, path.read_bytes()))
    return sorted(docs, key=lambda d: d.name)


def pydoc_documents() -> list[Document]:
    """The interpreter's help topics (`pydoc_data.topics`), sorted by topic name."""
    from pydoc_data.topics import topics

    return [Document(f"pydoc_data.topics/{key}", topics[key].encode("utf-8")) for key in sorted(topics)]


def is_heldout(name: str, percent: int = 5) -> bool:
    """Whether document `name` belongs to the held-out split (a hash of the name only)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100 < percent


def load_corpus(stdlib: Path | None = None, heldout_percent: int = 5) -> Corpus:
    """Build the corpus from this interpreter's standard library (see the module docstring)."""
    if not 0 < heldout_percent < 100:
        raise UserError(f"heldout_percent must be in 1..99, got {heldout_percent}")
    docs = stdlib_documents(stdlib) + pydoc_documents()
    train = [d for d in docs if not is_heldout(d.name, heldout_percent)]
    held = [d for d in docs if is_heldout(d.name, heldout_percent)]
    return Corpus(
        train=b"".join(d.data + SEPARATOR for d in train),
        heldout=b"".join(d.data + SEPARATOR for d in held),
        train_docs=tuple(d.name for d in train),
        heldout_docs=tuple(d.name for d in held),
        python_version=platform.python_version(),
        heldout_percent=heldout_percent,
    )


def write_heldout_text(path: Path, max_bytes: int | None = None, corpus: Corpus | None = None) -> int:
    """Write the held-out stream (or its first `max_bytes`, cut at a line end) to `path` atomically.

    Returns the number of bytes written. The text is what the bundled trace is made from.
    """
    data = (corpus or load_corpus()).heldout
    if max_bytes is not None and len(data) > max_bytes:
        cut = data.rfind(b"\n", 0, max_bytes)
        data = data[: cut + 1 if cut >= 0 else max_bytes]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, data)
    return len(data)
