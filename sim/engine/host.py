"""The host-DRAM expert cache of a tiered run: which experts are in host memory (docs/tiers.md).

States of an expert in host memory: ABSENT -> READING (a storage read in flight into a host slot,
or through a bounce buffer when no slot can be freed: `Transfer.staging` on the read) -> RESIDENT
(the read ended into a slot) -> ABSENT (evicted by the `host_cache.name` policy for another read).
A resident expert is *pinned* while a copy from it to the device, or a CPU job on it, is pending
or running, and a reading one holds its slot: neither can be evicted.

The machines (`sim.engine.tiers`, `sim.engine.events`) ask `lookup` for every device load and
CPU job, `admit` for every read, and report `read_done`; the policy only orders the residents.
Counters (`accesses`, `hits`, `late`: already being read, `reads`, `bypass`, `evictions`) feed the
summary's `host_cache_*` keys.
"""

from __future__ import annotations

from policies.base import HostCachePolicy
from sim.engine.transfer import Transfer

ABSENT, READING, RESIDENT = 0, 1, 2


class HostCache:
    def __init__(self, slots: int, policy: HostCachePolicy):
        assert slots >= 0, f"host cache of {slots} slots"
        self.slots = slots
        self.policy = policy
        self.resident: set[int] = set()
        self.reading: dict[int, Transfer] = {}  # key -> its storage read in flight
        self.pins: dict[int, int] = {}  # key -> pending copies / CPU jobs that need it in host memory
        self.cached_reads = 0  # of `reading`, the reads that hold a slot
        self.accesses = self.hits = self.late = self.reads = self.bypass = self.evictions = 0
        self.peak = 0

    def warm(self, keys: list[int]) -> None:
        """The policy's initial residents, in host memory before the clock starts."""
        assert len(keys) <= self.slots, f"{len(keys)} warm-start experts in a host cache of {self.slots}"
        for key in keys:
            self.resident.add(key)
            self.policy.on_insert(key, -1)
        self.peak = len(self.resident)

    def lookup(self, key: int, t: int) -> int:
        """Where `key` is (ABSENT, READING, RESIDENT) for a device load or a CPU job at row t; counted."""
        self.accesses += 1
        self.policy.on_access(key, t)
        if key in self.resident:
            self.hits += 1
            return RESIDENT
        if key in self.reading:
            self.late += 1
            return READING
        return ABSENT

    def state(self, key: int) -> int:
        """Where `key` is, uncounted (a prefetch into host asks)."""
        return RESIDENT if key in self.resident else READING if key in self.reading else ABSENT

    def admit(self, key: int, t: int, prefetch: bool = False) -> bool | None:
        """A read of `key` at row t: True = into a slot (a victim evicted if full), False = through a
        bounce buffer (nothing evictable), None = a prefetch into host that found no slot (skip it)."""
        if self.slots and len(self.resident) + self.cached_reads >= self.slots:
            victim = self.policy.victim(t, self._evictable)
            if victim is not None:
                assert self._evictable(victim), f"host policy {self.policy.name} named {victim}, not evictable"
                self.resident.discard(victim)
                self.policy.on_evict(victim)
                self.evictions += 1
        if self.slots and len(self.resident) + self.cached_reads < self.slots:
            self.cached_reads += 1
            self.policy.on_insert(key, t)
            return True
        return None if prefetch else False

    def _evictable(self, key: int) -> bool:
        return key in self.resident and not self.pins.get(key)

    def reading_started(self, read: Transfer) -> None:
        self.reads += 1
        self.bypass += read.staging
        self.reading[read.key] = read

    def read_done(self, read: Transfer) -> None:
        """A read ended: the expert is resident (a cached read), or its bounce buffer is gone."""
        if self.reading.get(read.key) is read:
            del self.reading[read.key]
        if not read.staging:
            self.cached_reads -= 1
            self.resident.add(read.key)
            if len(self.resident) > self.peak:
                self.peak = len(self.resident)
        assert len(self.resident) + self.cached_reads <= self.slots, (
            f"host cache holds {len(self.resident)} + {self.cached_reads} reading, {self.slots} slots")

    def pin(self, key: int) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key: int) -> None:
        n = self.pins[key] - 1
        assert n >= 0, f"host pin of {key} released twice"
        if n:
            self.pins[key] = n
        else:
            del self.pins[key]
