"""`lru` host cache: evict the expert least recently needed from host memory."""

from __future__ import annotations

from collections import OrderedDict

from policies.base import HostCachePolicy


class HostLRU(HostCachePolicy):
    name = "lru"

    def __init__(self, slots, ctx):
        super().__init__(slots, ctx)
        self.order: OrderedDict[int, None] = OrderedDict()  # resident keys, least recent first

    def on_access(self, key: int, t: int) -> None:
        if key in self.order:
            self.order.move_to_end(key)

    def on_insert(self, key: int, t: int) -> None:
        self.order[key] = None

    def on_evict(self, key: int) -> None:
        del self.order[key]

    def victim(self, t: int, evictable) -> int | None:
        for key in self.order:  # (the pinned few are skipped)
            if evictable(key):
                return key
        return None
