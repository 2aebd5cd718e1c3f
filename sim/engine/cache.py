"""The device expert cache: residency and capacity (a plain class, not a `simpy.Store`).

Expert life cycle (mixtral-offloading's, made explicit): ABSENT -> LOADING (a transfer holds the
slot) -> RESIDENT -> evicted (ABSENT again). Keys are `layer * experts + expert`.

The cache only keeps state and enforces capacity; *which* expert to evict is the cache policy's
choice (`policies/cache`). Invariants, checked on every change: `used_bytes <= capacity_bytes`; a
LOADING or pinned (in use by the current layer) expert is never evicted.
"""

from __future__ import annotations

ABSENT, LOADING, RESIDENT = 0, 1, 2
STATE_NAMES = ("absent", "loading", "resident")


class ExpertCache:
    """Residency of `layers * experts` experts in `capacity_bytes` of device memory."""

    def __init__(self, layers: int, experts: int, capacity_bytes: float):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.layers = layers
        self.experts = experts
        self.capacity_bytes = float(capacity_bytes)
        self.state = [ABSENT] * (layers * experts)  # list: faster than numpy for scalar access
        self.size_bytes = [0.0] * (layers * experts)
        self.pinned: set[int] = set()
        self.used_bytes = 0.0
        self.peak_bytes = 0.0
        self.per_layer = [0] * layers  # experts resident or loading, per layer
        self.slots_used = 0  # experts resident or loading

    def is_present(self, key: int) -> bool:
        """Resident or loading (a request for it needs no new transfer)."""
        return self.state[key] != ABSENT

    def free_bytes(self) -> float:
        return self.capacity_bytes - self.used_bytes

    def evictable(self, key: int) -> bool:
        return self.state[key] == RESIDENT and key not in self.pinned

    def begin_load(self, key: int, nbytes: float) -> None:
        """ABSENT -> LOADING; the slot is held from now on."""
        assert self.state[key] == ABSENT, f"expert {key} is {STATE_NAMES[self.state[key]]}, cannot load it"
        assert self.used_bytes + nbytes <= self.capacity_bytes * (1 + 1e-12), (
            f"loading expert {key} ({nbytes:.0f} B) would exceed the cache: "
            f"{self.used_bytes:.0f} + {nbytes:.0f} > {self.capacity_bytes:.0f} B"
        )
        self.state[key] = LOADING
        self.size_bytes[key] = nbytes
        self.used_bytes += nbytes
        if self.used_bytes > self.peak_bytes:
            self.peak_bytes = self.used_bytes
        self.per_layer[key // self.experts] += 1
        self.slots_used += 1

    def finish_load(self, key: int) -> None:
        """LOADING -> RESIDENT."""
        assert self.state[key] == LOADING, f"expert {key} finished loading but is {STATE_NAMES[self.state[key]]}"
        self.state[key] = RESIDENT

    def abort_load(self, key: int) -> None:
        """LOADING -> ABSENT (a cancelled transfer): the slot is freed."""
        assert self.state[key] == LOADING, f"cannot abort expert {key}: it is {STATE_NAMES[self.state[key]]}"
        self.state[key] = ABSENT
        self.used_bytes -= self.size_bytes[key]
        self.size_bytes[key] = 0.0
        self.per_layer[key // self.experts] -= 1
        self.slots_used -= 1

    def insert_resident(self, key: int, nbytes: float) -> None:
        """ABSENT -> RESIDENT at once (warm start, static pinning)."""
        self.begin_load(key, nbytes)
        self.state[key] = RESIDENT

    def evict(self, key: int) -> None:
        """RESIDENT -> ABSENT; refuses a pinned or loading expert."""
        assert self.state[key] == RESIDENT, f"cannot evict expert {key}: it is {STATE_NAMES[self.state[key]]}"
        assert key not in self.pinned, f"cannot evict expert {key}: it is in use by the current layer"
        self.state[key] = ABSENT
        self.used_bytes -= self.size_bytes[key]
        self.size_bytes[key] = 0.0
        self.per_layer[key // self.experts] -= 1
        self.slots_used -= 1

    def resident_keys(self) -> list[int]:
        return [k for k, s in enumerate(self.state) if s == RESIDENT]
