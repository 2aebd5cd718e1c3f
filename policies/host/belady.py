"""`belady` host cache: evict the resident expert whose next use in the trace's routing is farthest.

This is MIN over the stream of every routed (token, expert), in replay order: the optimum for a
host cache that saw every access. The host cache of a tiered run sees only the device's misses,
which depend on the device cache, so this is a strong offline heuristic there, not a bound. It
reads the replay's future: `workload.kind=replay` only."""

from __future__ import annotations

import heapq
from bisect import bisect_right

import numpy as np

from policies.base import HostCachePolicy

NEVER = 1 << 62


class HostBelady(HostCachePolicy):
    name = "belady"
    reads_replay_future = True

    def __init__(self, slots, ctx):
        super().__init__(slots, ctx)
        ids = np.asarray(ctx.trace.experts, dtype=np.int64)  # [T, L, k]
        T = ids.shape[0]
        keys = ids + (np.arange(ctx.layers) * ctx.experts)[None, :, None]
        rows = np.broadcast_to(np.arange(T)[:, None, None], ids.shape)
        ok = ids >= 0
        k, r = keys[ok], rows[ok]
        order = np.lexsort((r, k))
        k, r = k[order], r[order]
        starts = np.searchsorted(k, np.arange(ctx.layers * ctx.experts + 1)).tolist()
        rows_list = r.tolist()
        #: the rows routing each key, ascending (Python lists: `bisect` on them is the hot path)
        self._rows = [rows_list[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
        self.resident: dict[int, int] = {}  # key -> its next use as last computed
        self.heap: list[tuple[int, int]] = []  # (-next use, key); stale entries skipped on pop

    def _next_use(self, key: int, t: int) -> int:
        rows = self._rows[key]
        j = bisect_right(rows, t)
        return rows[j] if j < len(rows) else NEVER

    def _push(self, key: int, t: int) -> None:
        nxt = self._next_use(key, t)
        self.resident[key] = nxt
        heapq.heappush(self.heap, (-nxt, key))

    def on_access(self, key: int, t: int) -> None:
        if key in self.resident:
            self._push(key, t)

    def on_insert(self, key: int, t: int) -> None:
        self._push(key, t)

    def on_evict(self, key: int) -> None:
        del self.resident[key]

    def victim(self, t: int, evictable) -> int | None:
        heap, kept, found = self.heap, [], None
        while heap:
            neg, key = heapq.heappop(heap)
            nxt = self.resident.get(key)
            if nxt is None or -neg != nxt:
                continue  # stale
            if nxt <= t:  # its next use has passed (served from the device): look further
                self._push(key, t)
                continue
            kept.append((neg, key))
            if evictable(key):
                found = key
                break
        for entry in kept:
            heapq.heappush(heap, entry)
        return found
