"""`lfu` host cache: evict the resident expert needed least often from host memory so far (ties:
the least recently needed). Counts persist across evictions (an expert read back keeps its count)."""

from __future__ import annotations

import heapq

from policies.base import HostCachePolicy


class HostLFU(HostCachePolicy):
    name = "lfu"

    def __init__(self, slots, ctx):
        super().__init__(slots, ctx)
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}  # key -> the access order of its last access
        self.clock = 0
        self.resident: set[int] = set()
        self.heap: list[tuple[int, int, int]] = []  # (count, last, key); stale entries skipped on pop

    def on_access(self, key: int, t: int) -> None:
        self.clock += 1
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = self.clock
        if key in self.resident:
            heapq.heappush(self.heap, (self.count[key], self.clock, key))

    def on_insert(self, key: int, t: int) -> None:
        self.resident.add(key)
        heapq.heappush(self.heap, (self.count.get(key, 0), self.last.get(key, 0), key))

    def on_evict(self, key: int) -> None:
        self.resident.discard(key)

    def victim(self, t: int, evictable) -> int | None:
        heap, skipped, found = self.heap, [], None
        while heap:
            count, last, key = heapq.heappop(heap)
            if key not in self.resident or (count, last) != (self.count.get(key, 0), self.last.get(key, 0)):
                continue  # stale
            if evictable(key):
                found = key
                skipped.append((count, last, key))  # (it stays listed until `on_evict`)
                break
            skipped.append((count, last, key))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found
