"""`lfu`: evict the least frequently used expert (ties: least recently used).

Frequencies count every access since the start of the run and survive eviction (a perfect-LFU
history), so an expert that was hot before is favoured when it returns. Scope as in `lru`.

Cost: residents sit in a min-heap by (frequency, last access) per scope, with lazy deletion (an
entry is stale once its key was accessed again or left), so a miss costs O(log C).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from policies.base import CachePolicy, Context
from policies.cache.partition import layer_partitions, room_in_partition
from policies.registry import CACHE


@CACHE.register("lfu")
class LFU(CachePolicy):
    @dataclass
    class Knobs:
        scope: str = "layer"
        sizes: list[int] | None = field(default=None)

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        sizes = layer_partitions(knobs, ctx)
        self.per_layer = sizes is not None
        n = ctx.layers * ctx.experts
        self.freq = [0] * n
        self.last = [-1] * n  # access clock for the LRU tie-break
        self.clock = 0
        self.members: list[set[int]] = [set() for _ in range(ctx.layers if self.per_layer else 1)]
        #: per scope: (frequency, last access, key) of residents, a min-heap (lazy deletion)
        self.heaps: list[list[tuple[int, int, int]]] = [[] for _ in self.members]
        if self.per_layer:
            self.sizes = sizes

    def _scope(self, key: int) -> int:
        return key // self.ctx.experts if self.per_layer else 0

    def _touch(self, key: int) -> None:
        self.clock += 1
        self.last[key] = self.clock
        scope = self._scope(key)
        if key in self.members[scope]:
            heapq.heappush(self.heaps[scope], (self.freq[key], self.clock, key))

    def on_access(self, key: int, t: int) -> None:
        self.freq[key] += 1
        self._touch(key)

    def on_insert(self, key: int, t: int) -> None:
        self.members[self._scope(key)].add(key)
        self._touch(key)

    def on_evict(self, key: int) -> None:
        self.members[self._scope(key)].discard(key)

    def _coldest(self, scope: int, skip: set[int]) -> int | None:
        """The evictable resident of `scope` with the least (frequency, last access) not in `skip`
        (its entry stays in the heap), or None."""
        heap, cache, members = self.heaps[scope], self.ctx.cache, self.members[scope]
        held, found = [], None
        while heap:
            f, last, k = heap[0]
            if k not in members or self.last[k] != last:  # stale: evicted, or accessed since
                heapq.heappop(heap)
            elif not cache.evictable(k) or k in skip:  # loading or pinned now; evictable later
                held.append(heapq.heappop(heap))
            else:
                found = k
                break
        for entry in held:
            heapq.heappush(heap, entry)
        return found

    def victims(self, key: int, nbytes: float, t: int, layer: int, demand: bool = True) -> list[int] | None:
        cache = self.ctx.cache
        if self.per_layer:
            layer = key // self.ctx.experts
            if room_in_partition(cache, layer, self.sizes[layer], nbytes):
                return []
        elif cache.free_bytes() >= nbytes:
            return []
        scope = self._scope(key)
        if self.per_layer:
            k = self._coldest(scope, set())
            return None if k is None else [k]
        out, need = [], nbytes - cache.free_bytes()
        while need > 0:
            k = self._coldest(scope, set(out))
            if k is None:
                return None
            out.append(k)
            need -= cache.size_bytes[k]
        return out
