"""A run's memory hierarchy from its profile and `host_cache.*` / `tiers.*` (docs/tiers.md).

Where experts live and how they reach the device:

    expert_tier  unified  host cache           path of a device load
    host         any      -                    host_to_device (today's single link)
    storage      yes      - (refused if set)   storage_to_device (into the unified pool)
    storage      no       0 slots (off)        storage_to_device (the two hops as one link)
    storage      no       N > 0 slots          storage_to_host (a read, if not in the host cache),
                                               then host_to_device (a copy): `sim.engine.tiers`

The host cache's size: `host_cache.slots`, or `host_cache.bytes`, or by default the profile's
host memory less its `host_memory_reserve_bytes` and the model's non-expert weights (staged through
host memory when loaded), in whole experts, at most every expert; how it was decided is said in
the summary (`host_cache_from`). By default a profile has a host tier only when it describes one
(both hops and `host_memory_reserve_bytes`); otherwise the run is storage-direct, and says so.

Errors (`UserError`, one line naming the field; nothing is written): a host cache on a profile
whose experts are in host memory already, or with unified memory; a host cache larger than host
memory; both `slots` and `bytes`; a host cache asked of a profile that lacks a hop's link; an
unknown `host_cache.name` or `prefetch.into`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sim.errors import UserError

INTO = ("device", "host")


@dataclass
class HostCacheOptions:
    name: str = "lru"  # lru | lfu | static | belady (policies/host): what host DRAM keeps
    slots: int | None = None  # host-cache capacity in experts (0: off, experts go storage_to_device)
    bytes: float | None = None  # or in bytes; neither: host memory less the profile's reserve and the non-expert weights


@dataclass
class TierOptions:
    pipelined: bool = False  # a copy from storage starts once the read's first chunk is in (else once the read ends)
    chunks: int = 8  # chunks per expert when pipelined


@dataclass(frozen=True)
class Hierarchy:
    """The decided hierarchy of a run: `slots` = 0 means no host tier (a single link)."""

    slots: int
    bytes: float
    said: str  # how the size was decided (`host_cache_from`)
    policy: str
    pipelined: bool
    chunks: int

    @property
    def tiered(self) -> bool:
        return self.slots > 0


def decide(host_cache: HostCacheOptions, tiers: TierOptions, hw, preset) -> Hierarchy:
    """The host tier of a run on `hw` with model `preset` (module docstring); UserError if impossible."""
    from policies.host import host_policy

    host_policy(host_cache.name)  # an unknown name is an error whether or not the tier is on
    if tiers.chunks < 1:
        raise UserError(f"tiers.chunks must be >= 1, got {tiers.chunks}")
    slots, nbytes = host_cache.slots, host_cache.bytes
    if slots is not None and nbytes is not None:
        raise UserError("give host_cache.slots or host_cache.bytes, not both")
    if slots is not None and slots < 0:
        raise UserError(f"host_cache.slots must be >= 0, got {slots}")
    if nbytes is not None and nbytes < 0:
        raise UserError(f"host_cache.bytes must be >= 0, got {nbytes:g}")
    given = slots is not None or nbytes is not None
    asked = bool(slots) or bool(nbytes)
    h = _decide(host_cache, tiers, hw, preset, slots, nbytes, given, asked)
    if tiers.pipelined and not h.tiered:
        why = h.said or f"{hw.name} keeps its experts in {hw.expert_tier}" + (" with unified memory" if hw.unified_memory else "")
        raise UserError(f"tiers.pipelined=true: this run has no host tier ({why}); pipelined reads need a host "
                        f"cache in front of storage (docs/tiers.md)")
    return h


def _decide(host_cache: HostCacheOptions, tiers: TierOptions, hw, preset, slots, nbytes, given: bool,
            asked: bool) -> Hierarchy:
    all_experts = preset.layers * preset.experts
    off = Hierarchy(0, 0.0, "", host_cache.name, tiers.pipelined, tiers.chunks)
    if hw.expert_tier != "storage":
        if asked:
            raise UserError(f"host_cache: {hw.name} keeps its experts in host memory (expert_tier: {hw.expert_tier}); "
                            f"a host cache needs experts on storage (e.g. hw=desktop-nvme.yaml)")
        return off
    if hw.unified_memory:
        if asked:
            raise UserError(f"host_cache: {hw.name} has unified memory: host memory is the device's, so its "
                            f"expert cache is the host cache (give cache.slots / cache.bytes instead)")
        return off
    if given and not asked:
        return dataclasses.replace(off, said="host_cache off (storage_to_device)")
    hops = [link for link in ("storage_to_host", "host_to_device") if link not in hw.links]
    if not given and (hops or hw.host_memory_reserve_bytes is None):  # the profile describes no host tier
        what = f"no {' or '.join(hops)} link" if hops else "no host_memory_reserve_bytes"
        return dataclasses.replace(off, said=f"no host tier: {hw.name} gives {what} (storage_to_device)")
    for link in ("storage_to_host", "host_to_device"):
        if link not in hw.links:
            raise UserError(f"links.{link}: {hw.name} keeps experts on storage behind a host cache, which needs the "
                            f"links storage_to_host and host_to_device (it defines {', '.join(hw.links)}); "
                            f"add it, or give host_cache.slots=0")
    e_bytes = preset.expert_bytes
    if slots is not None:
        said = f"host_cache.slots={slots}"
    elif nbytes is not None:
        slots = int(nbytes // e_bytes)
        said = f"host_cache.bytes={nbytes:.0f}"
    else:
        if hw.host_memory_reserve_bytes is None:
            raise UserError(f"host_memory_reserve_bytes: {hw.name} gives no host reserve to size the host cache by "
                            f"default; give host_cache.slots=N or host_cache.bytes=B (0: off)")
        free = hw.host_memory_bytes - hw.host_memory_reserve_bytes - preset.non_expert_bytes
        slots = max(0, int(free // e_bytes))
        said = (f"{hw.name}'s {hw.host_memory_bytes / 1e9:.1f} GB host memory less its "
                f"{hw.host_memory_reserve_bytes / 1e9:.1f} GB reserve and {preset.non_expert_bytes / 1e9:.2f} GB of "
                f"non-expert weights")
        if slots < 1:
            raise UserError(f"host_cache: {said} leave no room for one expert of {e_bytes / 1e6:.1f} MB; give "
                            f"host_cache.slots=0 (off) or a profile with more host memory")
    if slots * e_bytes > hw.host_memory_bytes:
        raise UserError(f"host_cache: {slots} experts of {e_bytes / 1e6:.1f} MB ({slots * e_bytes / 1e9:.1f} GB) exceed "
                        f"{hw.name}'s host_memory_bytes ({hw.host_memory_bytes / 1e9:.1f} GB)")
    if slots < 1:
        raise UserError(f"host_cache: {said} holds no whole expert of {e_bytes / 1e6:.1f} MB; give more, or 0 (off)")
    slots = min(slots, all_experts)
    return Hierarchy(slots, slots * e_bytes, said, host_cache.name, tiers.pipelined, tiers.chunks)


def check_into(into: str, hierarchy: Hierarchy) -> bool:
    """`prefetch.into` -> True when prefetches go into host memory only; UserError if invalid here."""
    if into not in INTO:
        raise UserError(f"prefetch.into must be one of {', '.join(INTO)}, got {into!r}")
    if into == "host" and not hierarchy.tiered:
        raise UserError("prefetch.into=host needs a host cache (experts on storage, host_cache.slots > 0: "
                        "docs/tiers.md)")
    return into == "host"
