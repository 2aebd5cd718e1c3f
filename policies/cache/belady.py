"""`belady`: offline optimal eviction (MIN): evict the resident expert whose next use is furthest.

"Now" is the step being simulated, t * L + the engine's current layer (`ctx.now_layer`).

Reads the future (a bound, not a deployable policy). With bypass: an expert whose next use is
later than every eviction candidate's is not cached (a demand load goes through a staging
buffer; such a prefetch is skipped). Next uses come from the gating plan when
the gating policy is stateless (so adaptive gating's dropped experts do not count as uses), else
from the trace's top-k. Ties
(never used again, or used at the same step): the higher key first. `scope=layer` restricts
victims to the requesting layer's uniform partition; default `global`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from policies.base import CachePolicy, Context
from policies.cache.partition import room_in_partition, uniform_sizes
from policies.registry import CACHE
from sim.errors import UserError

NEVER = 1 << 62


@CACHE.register("belady")
class Belady(CachePolicy):
    @dataclass
    class Knobs:
        scope: str = "global"
        patient: bool = True  # skip a prefetch when an expert in use now will be a better victim

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.scope not in ("layer", "global"):
            raise UserError(f"cache.scope must be 'layer' or 'global', got {knobs.scope!r}")
        L, E = ctx.layers, ctx.experts
        plan = ctx.gating_plan
        ids = plan.ids if plan is not None else ctx.trace.experts.astype(np.int64)  # [T, L, k]
        T, _, k = ids.shape
        steps = np.broadcast_to(np.arange(T)[:, None, None] * L + np.arange(L)[None, :, None], ids.shape)
        keys = ids + (np.arange(L) * E)[None, :, None]
        valid = ids >= 0
        order = np.lexsort((steps[valid], keys[valid]))
        ks, st = keys[valid][order], steps[valid][order]
        bounds = np.searchsorted(ks, np.arange(L * E + 1))
        self.uses = [st[bounds[i]:bounds[i + 1]].tolist() for i in range(L * E)]  # sorted steps per key
        self.L, self.E = L, E
        self.per_layer = knobs.scope == "layer"
        self.sizes = uniform_sizes(ctx.capacity_slots, L) if self.per_layer else None
        self.members: list[set[int]] = [set() for _ in range(L if self.per_layer else 1)]

    def next_use(self, key: int, now: int) -> int:
        u = self.uses[key]
        i = bisect.bisect_left(u, now)
        return u[i] if i < len(u) else NEVER

    def on_insert(self, key: int, t: int) -> None:
        self.members[key // self.E if self.per_layer else 0].add(key)

    def on_evict(self, key: int) -> None:
        self.members[key // self.E if self.per_layer else 0].discard(key)

    def victims(self, key: int, nbytes: float, t: int, demand: bool = True) -> list[int] | None:
        cache = self.ctx.cache
        layer = key // self.E
        if self.per_layer:
            if room_in_partition(cache, layer, self.sizes[layer], nbytes):
                return []
        elif cache.free_bytes() >= nbytes:
            return []
        now = max(t, 0) * self.L + self.ctx.now_layer  # the step being simulated
        group = self.members[layer if self.per_layer else 0]
        cands = sorted((k for k in group if cache.evictable(k)), key=lambda k: (-self.next_use(k, now), -k))
        # bypass (MIN with optional admission): if `key` is next needed after every candidate,
        # keeping the residents is better; the engine then uses a staging buffer
        # when `key` is next needed after this step (a demand load is served now in any case, so
        # what matters is its following use; a prefetch is needed at its target step)
        mine = self.next_use(key, now + 1)
        # a prefetch can wait: if an expert in use right now (pinned) will be a better victim once
        # released, skip this prefetch rather than evict something needed sooner (it is retried)
        later = -1
        if not demand and self.knobs.patient:
            later = max((self.next_use(k, now + 1) for k in group if k in cache.pinned), default=-1)
        out, need = [], nbytes - cache.free_bytes()
        for k in cands:
            if self.next_use(k, now) <= mine or self.next_use(k, now) < later:
                return None
            out.append(k)
            need -= cache.size_bytes[k]
            if need <= 0 or self.per_layer:
                return out
        return None
