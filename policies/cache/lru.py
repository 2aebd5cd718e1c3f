"""`lru`: evict the least recently used expert, globally or within the layer's partition.

Recency is updated on every access (hit or use after a load) and on insertion. `scope=layer`
gives each layer a fixed partition (`sizes`, or a uniform split): a load into a full partition
evicts that layer's LRU expert (mixtral-offloading's cache). `scope=global` evicts the
least recently used expert anywhere. Only evictable experts (resident, not in use by the current
layer) are candidates; if none is, the load cannot take a slot (the engine then uses a staging
buffer for a demand load, or skips a prefetch).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from policies.base import CachePolicy, Context
from policies.cache.partition import layer_partitions
from policies.registry import CACHE
from sim.engine.cache import RESIDENT


@CACHE.register("lru")
class LRU(CachePolicy):
    @dataclass
    class Knobs:
        scope: str = "layer"  # "layer" (per-layer partitions) or "global"
        sizes: list[int] | None = field(default=None)  # per-layer slots (scope=layer); default uniform

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        sizes = layer_partitions(knobs, ctx)
        self.per_layer = sizes is not None
        self.E = ctx.experts
        L = ctx.layers
        if self.per_layer:
            self.sizes = sizes
            self.order = [OrderedDict() for _ in range(L)]
        else:
            self.order = [OrderedDict()]
        #: key -> the recency order it belongs to (its layer's, or the global one)
        self.order_of = [self.order[key // self.E if self.per_layer else 0] for key in range(L * self.E)]

    def on_access(self, key: int, t: int) -> None:
        self.order_of[key].move_to_end(key)

    def on_insert(self, key: int, t: int) -> None:
        self.order_of[key][key] = None

    def on_evict(self, key: int) -> None:
        del self.order_of[key][key]

    def victims(self, key: int, nbytes: float, t: int, layer: int, demand: bool = True) -> list[int] | None:
        cache = self.ctx.cache
        if self.per_layer:  # on the simulator's hot path: `room_in_partition` and `evictable`, inline
            layer = key // self.E
            if cache.per_layer[layer] < self.sizes[layer] and cache.capacity_bytes - cache.used_bytes >= nbytes:
                return []
            state, pinned = cache.state, cache.pinned
            for k in self.order[layer]:
                if state[k] == RESIDENT and k not in pinned:
                    return [k]
            return None
        need = nbytes - cache.free_bytes()
        out: list[int] = []
        for k in self.order[0]:
            if need <= 0:
                break
            if cache.evictable(k):
                out.append(k)
                need -= cache.size_bytes[k]
        return out if need <= 0 else None
