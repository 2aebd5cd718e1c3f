"""Where a load goes: shared by the simulator's engine and the real-run engine.

Both engines issue loads the same way: a prefetch may be refused (an idle-only prefetch finds the
link busy; no room and no staging buffer), a load takes a cache slot (evicting the cache policy's
victims) or else a transient staging buffer, and an issued prefetch is counted and tracked. This
mixin holds those decisions; each engine then submits the transfer to its own link (simulated or
real). A host class provides: `cache`, `cache_policy`, `opt.staging_buffers`,
`prefetch` (the policy), `prefetch_idle_only`, `prefetch_staging`, `staging_in_use`, `prefetch_skipped`,
`unused_prefetch`, `prefetch_by_layer` (filled only if `track_prefetch_targets`: the policy waits for
its prefetches or stages them), `rec`, `E`, and `_evict(key)`.
"""

from __future__ import annotations

from sim.engine.link import DEMAND, PREFETCH

REFUSED = None


class LoadAdmission:
    def _admit(self, key: int, priority: int, t: int, nbytes: float, staging: bool,
               link_full: bool) -> bool | None:
        """Decide where a load of `key` goes: False = a cache slot (victims evicted, slot taken),
        True = a staging buffer (counted), None = refused (a prefetch; counted as skipped)."""
        if priority == PREFETCH and self.prefetch_idle_only and link_full:
            self.prefetch_skipped += 1
            return REFUSED
        victims = None if staging else self.cache_policy.victims(key, nbytes, t, priority == DEMAND)
        if victims is None:
            if priority == PREFETCH and (not (self.prefetch_staging or self.prefetch.stage_without_slot)
                                         or self.staging_in_use >= self.opt.staging_buffers):
                self.prefetch_skipped += 1
                return REFUSED
            self.staging_in_use += 1
            assert self.staging_in_use <= self.opt.staging_buffers, (
                f"{self.staging_in_use} staging buffers in use, only {self.opt.staging_buffers} exist")
            return True
        for v in victims:
            self._evict(v)
        self.cache.begin_load(key, nbytes)
        self.cache_policy.on_insert(key, t)
        return False

    def _note_issued(self, tr, key: int, priority: int) -> None:
        """Bookkeeping of an issued transfer (in flight; a prefetch is tracked until used or wasted)."""
        self.inflight[key] = tr
        self.rec.loads.append(tr)
        if priority == PREFETCH:
            self.unused_prefetch.add(key)
            if self.track_prefetch_targets:
                self.prefetch_by_layer.setdefault(key // self.E, []).append(tr)
            self.rec.per_layer["prefetch_issued"][key // self.E] += 1
