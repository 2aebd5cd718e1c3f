"""Shared by prefetch policies: the first `count` candidates that are not on the device."""

from __future__ import annotations

from collections.abc import Callable, Iterable


def first_absent(keys: Iterable[int], present: Callable[[int], bool], count: int) -> list[int]:
    """The first `count` keys (in the given order) that are neither resident nor loading."""
    out: list[int] = []
    for key in keys:
        if not present(key):
            out.append(key)
            if len(out) == count:
                break
    return out
