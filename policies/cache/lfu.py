"""`lfu`: evict the least frequently used expert (ties: least recently used).

Frequencies count every access since the start of the run and survive eviction (a perfect-LFU
history), so an expert that was hot before is favoured when it returns. Scope as in `lru`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.base import CachePolicy, Context
from policies.cache.partition import check_sizes, room_in_partition, uniform_sizes
from policies.registry import CACHE
from sim.errors import UserError


@CACHE.register("lfu")
class LFU(CachePolicy):
    @dataclass
    class Knobs:
        scope: str = "layer"
        sizes: list[int] | None = field(default=None)

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.scope not in ("layer", "global"):
            raise UserError(f"cache.scope must be 'layer' or 'global', got {knobs.scope!r}")
        self.per_layer = knobs.scope == "layer"
        n = ctx.layers * ctx.experts
        self.freq = [0] * n
        self.last = [-1] * n  # access clock for the LRU tie-break
        self.clock = 0
        self.members: list[set[int]] = [set() for _ in range(ctx.layers if self.per_layer else 1)]
        if self.per_layer:
            self.sizes = (check_sizes(knobs.sizes, ctx.capacity_slots, ctx.layers, ctx.experts) if knobs.sizes
                          else uniform_sizes(ctx.capacity_slots, ctx.layers))

    def _set(self, key: int) -> set[int]:
        return self.members[key // self.ctx.experts] if self.per_layer else self.members[0]

    def on_access(self, key: int, t: int) -> None:
        self.freq[key] += 1
        self.clock += 1
        self.last[key] = self.clock

    def on_insert(self, key: int, t: int) -> None:
        self._set(key).add(key)
        self.clock += 1
        self.last[key] = self.clock

    def on_evict(self, key: int) -> None:
        self._set(key).discard(key)

    def victims(self, key: int, nbytes: float, t: int, demand: bool = True) -> list[int] | None:
        cache = self.ctx.cache
        if self.per_layer:
            layer = key // self.ctx.experts
            if room_in_partition(cache, layer, self.sizes[layer], nbytes):
                return []
        elif cache.free_bytes() >= nbytes:
            return []
        cands = sorted((k for k in self._set(key) if cache.evictable(k)), key=lambda k: (self.freq[k], self.last[k]))
        if self.per_layer:
            return cands[:1] or None
        out, need = [], nbytes - cache.free_bytes()
        for k in cands:
            out.append(k)
            need -= cache.size_bytes[k]
            if need <= 0:
                return out
        return None
