"""`static` host cache: the experts the replayed trace routes most often fill host memory before the
first token and never leave; every other expert is read through a bounce buffer, uncached. The
choice has seen the whole trace (an in-sample fit: said in the summary's `in_sample_fit`)."""

from __future__ import annotations

import numpy as np

from policies.base import HostCachePolicy


class HostStatic(HostCachePolicy):
    name = "static"
    in_sample_fit = "host_cache.name=static: the replayed trace's routing counts"

    def warm_start(self) -> list[int]:
        ctx = self.ctx
        ids = np.asarray(ctx.trace.experts, dtype=np.int64)  # [T, L, k], -1: none
        keys = (ids + (np.arange(ctx.layers) * ctx.experts)[None, :, None])[ids >= 0]
        count = np.bincount(keys, minlength=ctx.layers * ctx.experts)
        order = np.lexsort((np.arange(count.size), -count))  # most routed first, ties by key
        return order[: self.slots].tolist()

    def victim(self, t: int, evictable) -> int | None:
        return None
