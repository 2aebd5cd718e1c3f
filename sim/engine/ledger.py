"""Where every expert is and what every load is for: the bookkeeping every driver of the engine holds.

One `Ledger` per run, shared by the step description (`sim/engine/step.py`) and whichever machine
executes it (simulated or real). It owns no clock and moves no bytes; it decides where a load goes
and keeps the books when loads are issued, end, and are used:

- `admit`: a prefetch may be refused (an idle-only prefetch finds every channel busy; no slot and
  no staging buffer); a load takes a cache slot (the cache policy's victims evicted) or else a
  staging buffer;
- `issued` / `applied` (a load ended, in time order: the expert becomes resident, or a cut
  prefetch gives its slot or buffer back) / `released` (a loaded expert was computed: its staging
  buffer is freed, or AdapMoE's admit-on-use lets a right prefetch into the cache);
- prefetch accounting: issued, used (an active expert needed it), late (still in flight then),
  wasted (evicted, dropped, cut or never used).

Invariants, checked with messages: at most `staging_buffers` staging buffers in use and never
fewer than none; a staging buffer is freed once. The machine is told of evictions, freed buffers
and adopted ones (`on_evicted`, `on_staging_freed`, `on_adopted`), so that a real machine can give
its memory back; a simulated one ignores them.
"""

from __future__ import annotations

from policies.base import CachePolicy, PrefetchPolicy
from sim.engine.cache import ExpertCache
from sim.engine.recorder import Recorder
from sim.engine.transfer import DEMAND, PREFETCH, Transfer


class Ledger:
    def __init__(self, cache: ExpertCache, cache_policy: CachePolicy, prefetch: PrefetchPolicy, experts: int,
                 expert_bytes: float, staging_buffers: int, rec: Recorder, demand_reserve: int = 0):
        self.cache, self.cache_policy, self.prefetch = cache, cache_policy, prefetch
        self.E = experts
        self.expert_bytes = expert_bytes
        self.staging_buffers = staging_buffers
        self.rec = rec
        self.loads = rec.loads
        self.machine = None  # set by the engine (`attach`): told of evictions and freed buffers
        self.notify = False  # whether the machine wants to be told (one that holds real memory)
        self.inflight: dict[int, Transfer] = {}  # key -> its transfer while loading (cache or staging)
        self.unused: set[int] = set()  # prefetched keys not yet used
        #: in-flight prefetches listed by target layer, kept only when a layer must look at them
        self.by_target: dict[int, list[Transfer]] = {}
        self.track_targets = bool(prefetch.wait_for_prefetch or prefetch.admit_on_use)
        self.prefetch_staging = bool(prefetch.admit_on_use)  # every prefetch to a staging buffer (AdapMoE)
        self.staging_in_use = 0
        #: staging buffers a prefetch may never take: a decode layer's demand loads (at most top-k)
        #: always find one, however many staged prefetches are in flight
        self.demand_reserve = demand_reserve
        self.prefetch_staging_held = 0  # of `staging_in_use`, the buffers prefetches hold
        self.prefetch_skipped = 0
        self.prefetch_cancelled = 0

    # ------------------------------------------------------------------ loads
    def admit(self, key: int, priority: int, t: int, layer: int, nbytes: float, staging: bool,
              link_full: bool) -> bool | None:
        """Where a load of `key` goes, decided at step (t, `layer`): False = a cache slot (its victims
        evicted, the slot taken), True = a staging buffer (counted), None = refused (a prefetch).
        `link_full`: every channel busy (only read for an idle-only prefetch)."""
        prefetch = self.prefetch
        if priority == PREFETCH and prefetch.idle_only and link_full:
            self.prefetch_skipped += 1
            return None
        victims = None if staging else self.cache_policy.victims(key, nbytes, t, layer, priority == DEMAND)
        if victims is None:
            if priority == PREFETCH:
                if (not (self.prefetch_staging or prefetch.stage_without_slot)
                        or self.staging_in_use >= self.staging_buffers
                        or self.prefetch_staging_held >= self.staging_buffers - self.demand_reserve):
                    self.prefetch_skipped += 1
                    return None
                self.prefetch_staging_held += 1
            self.staging_in_use += 1
            assert self.staging_in_use <= self.staging_buffers, (
                f"{self.staging_in_use} staging buffers in use, only {self.staging_buffers} exist")
            return True
        for v in victims:
            self.evict(v)
        self.cache.begin_load(key, nbytes)
        self.cache_policy.on_insert(key, t)
        return False

    def issued(self, tr: Transfer) -> None:
        """A transfer admitted by `admit` is on its way."""
        key = tr.key
        tr.holds_staging = tr.staging
        self.inflight[key] = tr
        self.loads.add(tr)
        if tr.priority == PREFETCH:
            self.unused.add(key)
            if self.track_targets:
                self.by_target.setdefault(key // self.E, []).append(tr)
            self.rec.per_layer["prefetch_issued"][key // self.E] += 1

    def applied(self, tr: Transfer, moved_bytes: float) -> None:
        """A transfer ended (the machine calls this in time order); `moved_bytes` it really moved."""
        self.loads.finish(tr, moved_bytes)
        key, inflight = tr.key, self.inflight
        if tr.cancelled:  # a prefetch cut short for a demand load: nothing usable arrived
            if inflight.get(key) is tr:
                del inflight[key]
            if tr.staging:
                held = tr.holds_staging
                self.free_staging(tr)
                if held and self.notify:
                    self.machine.on_staging_freed(tr)
            else:
                self.cache.abort_load(key)
                self.cache_policy.on_evict(key)
                if self.notify:
                    self.machine.on_evicted(key)
            if key in self.unused:
                self._wasted(key, key // self.E)
            self.prefetch_cancelled += 1
        elif not tr.staging:  # a cache load (a staging buffer is released after its compute)
            if inflight.get(key) is tr:
                del inflight[key]
            self.cache.finish_load(key)

    def released(self, tr: Transfer, t: int, layer: int) -> None:
        """A loaded expert was computed: free its staging buffer, or note the cache access."""
        if not tr.staging:
            self.cache_policy.on_access(tr.key, t)
            return
        self.free_staging(tr)  # staging data is dropped once used: a later request loads it again
        if tr.priority == PREFETCH and self.prefetch_staging and tr.nbytes == self.expert_bytes:
            # AdapMoE: a right prefetch enters the layer's cache once used, evicting its LRU expert
            victims = self.cache_policy.victims(tr.key, tr.nbytes, t, layer)
            if victims is not None:
                for v in victims:
                    self.evict(v)
                self.cache.insert_resident(tr.key, tr.nbytes)
                self.cache_policy.on_insert(tr.key, t)
                self.cache_policy.on_access(tr.key, t)
                if self.notify:
                    self.machine.on_adopted(tr)
                return
        if self.notify:
            self.machine.on_staging_freed(tr)

    def free_staging(self, tr: Transfer) -> None:
        """Give back `tr`'s staging buffer (once), and forget it as the expert's load."""
        if tr.holds_staging:
            tr.holds_staging = False
            self.staging_in_use -= 1
            if tr.priority == PREFETCH:
                self.prefetch_staging_held -= 1
            assert self.staging_in_use >= 0, f"staging buffers freed more often than taken (expert {tr.key})"
        if self.inflight.get(tr.key) is tr:
            del self.inflight[tr.key]

    def drop_unused_staged(self, pending: list[Transfer], layer: int) -> None:
        """AdapMoE: the staged prefetches aimed at `layer` that it did not use are dropped with their buffers."""
        for tr in pending:
            if tr.staging and self.inflight.get(tr.key) is tr:
                self.free_staging(tr)
                if self.notify:
                    self.machine.on_staging_freed(tr)
                if tr.key in self.unused:
                    self._wasted(tr.key, layer)

    def evict(self, key: int) -> None:
        self.cache.evict(key)
        self.cache_policy.on_evict(key)
        if self.notify:
            self.machine.on_evicted(key)
        if key in self.unused:
            self._wasted(key, key // self.E)

    def _wasted(self, key: int, layer: int) -> None:
        """A prefetched expert leaves unused (evicted, dropped or cut): counted wasted at `layer`."""
        self.unused.discard(key)
        self.rec.per_layer["prefetch_wasted"][layer] += 1

    def resize_cache(self, capacity_bytes: float, t: int) -> None:
        """The expert cache may now use `capacity_bytes` (serving with a shared KV cache: it shrinks
        as KV grows, grows back as requests finish). Shrinking evicts through the cache policy, as
        if it made room in the layer that holds the most experts (the next fullest when that one
        has nothing to evict), until the residents fit; experts still loading cannot be evicted, so
        the cache may stay over until they land (the next call tries again; a load never starts
        without room)."""
        cache = self.cache
        cache.capacity_bytes = float(capacity_bytes)
        while cache.used_bytes > cache.capacity_bytes * (1 + 1e-12):
            for layer in sorted(range(cache.layers), key=lambda x: -cache.per_layer[x]):  # fullest first
                victims = self.cache_policy.victims(layer * self.E, 0.0, t, layer)
                if victims:
                    break
            else:  # nothing resident to evict anywhere: loads in flight hold the rest
                return
            for v in victims:
                self.evict(v)

    def finish(self) -> None:
        """The run is over: prefetches never used count as wasted."""
        for key in self.unused:
            self.rec.per_layer["prefetch_wasted"][key // self.E] += 1
        self.unused.clear()
