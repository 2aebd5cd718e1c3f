"""Per-layer partitions of the expert cache, shared by partitioned cache policies.

`sizes[l]` = slots reserved for layer l. Uniform split: C // L each, the remainder to the first
layers (early layers are never prefetched in AdapMoE, so they gain most from an extra slot).
"""

from __future__ import annotations

import numpy as np

from sim.errors import UserError


def evictable_members(cache, member, maybe_loading: set[int]) -> np.ndarray:
    """The keys (ascending) of `member` ([L * E] bool: the scope's cached experts) that may be
    evicted now: neither pinned by the current step nor still loading. `maybe_loading` (members
    inserted whose load may not have ended) loses the keys that have landed."""
    from sim.engine.cache import RESIDENT

    state, pinned = cache.state, cache.pinned
    if maybe_loading:
        for k in [k for k in maybe_loading if state[k] == RESIDENT]:
            maybe_loading.discard(k)
    cand = member
    if pinned or maybe_loading:
        cand = cand.copy()
        if pinned:
            cand[list(pinned)] = False
        if maybe_loading:
            cand[list(maybe_loading)] = False
    return np.flatnonzero(cand)


def layer_partitions(knobs, ctx) -> list[int] | None:
    """The per-layer partition sizes of a cache policy with knobs `scope` (layer | global) and
    `sizes`: `sizes` checked, or the uniform split, for `scope=layer`; None for `scope=global`.
    UserError for another scope, or sizes given with a global scope."""
    if knobs.scope not in ("layer", "global"):
        raise UserError(f"cache.scope must be 'layer' or 'global', got {knobs.scope!r}")
    if knobs.scope == "global":
        if knobs.sizes:
            raise UserError("cache.sizes applies to cache.scope=layer only")
        return None
    C, L = ctx.capacity_slots, ctx.layers
    return check_sizes(knobs.sizes, C, L, ctx.experts) if knobs.sizes else uniform_sizes(C, L)


def uniform_sizes(capacity_slots: int, layers: int) -> list[int]:
    base, extra = divmod(capacity_slots, layers)
    return [base + (1 if i < extra else 0) for i in range(layers)]


def check_sizes(sizes: list[int], capacity_slots: int, layers: int, experts: int) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != layers:
        raise UserError(f"cache.sizes has {len(sizes)} entries; the model has {layers} layers")
    if any(s < 0 or s > experts for s in sizes):
        raise UserError(f"cache.sizes must be between 0 and {experts} per layer")
    if sum(sizes) > capacity_slots:
        raise UserError(f"cache.sizes sum to {sum(sizes)} slots, more than the cache's {capacity_slots}")
    return sizes


def room_in_partition(cache, layer: int, size: int, nbytes: float) -> bool:
    """True if layer `layer`'s partition of `size` slots (and the cache's bytes) can take one more."""
    return cache.per_layer[layer] < size and cache.free_bytes() >= nbytes
