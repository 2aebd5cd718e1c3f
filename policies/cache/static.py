"""`static`: pin the most used experts, measured on a profiling trace; never evict.

The cache is filled before the first token with the `capacity_slots` experts used most often in
the profiling trace (`profile`: a trace folder; default the replayed trace itself, an optimistic
choice since it has seen the future — give a separate profiling trace for a fair run). Ties: lower
layer, then lower expert id. Misses are not cached (they use staging buffers), as in Fiddler /
ktransformers' static placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import CachePolicy, Context
from policies.registry import CACHE


@CACHE.register("static")
class Static(CachePolicy):
    @dataclass
    class Knobs:
        profile: str = ""  # trace folder to count usage on; empty: the replayed trace

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.profile:
            from sim.machine.models import check_trace
            from sim.runner import load_trace

            prof = load_trace(knobs.profile)
            check_trace(ctx.preset, prof.model.layers, prof.model.experts, prof.model.top_k)
        else:
            prof = ctx.trace
            self.in_sample_fit = "its hot set counted on the replayed trace (give cache.profile=FIT_DIR)"
        L, E = ctx.layers, ctx.experts
        ids = prof.experts[prof.is_decode] if prof.is_decode.any() else prof.experts  # [T, L, k]
        keys = (ids + (np.arange(L) * E)[None, :, None]).reshape(-1)
        counts = np.bincount(keys[ids.reshape(-1) >= 0], minlength=L * E)
        order = np.lexsort((np.arange(L * E), -counts))  # most used first; ties: lower key
        self.pinned = [int(k) for k in order[: ctx.capacity_slots]]

    def warm_start(self) -> list[int]:
        return self.pinned

    def victims(self, key: int, nbytes: float, t: int, layer: int, demand: bool = True) -> list[int] | None:
        return [] if self.ctx.cache.free_bytes() >= nbytes else None
