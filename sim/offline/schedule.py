"""The best offline schedule of prefetches and evictions we know: MIN's loads, issued early.

Integrated prefetching and caching (Cao, Felten, Karlin, Li, SIGMETRICS 1995) starts from the
optimal demand schedule's replacements and moves each fetch earlier. Their *Conservative*
schedule makes exactly MIN's replacements and starts each fetch as soon as the block it evicts
is no longer needed before the fetched one; it never does more fetches than MIN. Adapted here:

- MIN's loads are those of `belady` (exact for the step semantics) in a demand-only replay,
  listed in the order the engine issues them, each with its victim (or a free slot, or a bypass
  through a staging buffer). `min_loads` replays that with no time at all, on a shadow cache.
- Each load i may be issued from step `issue_i = max(issue_{i-1}, u_i + 1)`, where `u_i` is the
  victim's last use before the load's step (a free-slot load: as soon as the previous one): the
  prefetch hook of step u_i + 1 is the first moment the victim is resident and not pinned, and
  issuing in MIN's order keeps the link's queue in MIN's order too.
- A bypassed load (MIN caches it nowhere) is prefetched into a staging buffer, held until its
  use, as early as the previous load, while no more than `staging_buffers - top_k` are held
  (the rest stay free for demand loads); when none is free, it and the loads after it wait, at
  the latest until its step, where it is a demand load. A load of a prefill step is not moved
  (the engine does not prefetch during prefill). Demand loads go ahead of queued prefetches.

Why it is never slower than `belady` without prefetch (on the same gating) where copies do not
share the device's memory bandwidth: the two runs move the same experts in the same order
(within a step, demand loads may go first) and evict the same ones; every load is issued no
later than the demand run issues it, so with the link's FIFO order each one completes no later;
a step computes each expert once its load is in, and compute takes the same time in both, so
every step ends no later. Where copies do share it (`sim/machine/contention.py`), a copy moved under
compute slows that compute by the bandwidth it takes, which can cost more than the stall it
saves (rarely: about 1 random small case in 1,000, by under 1%); `oracle=true` therefore takes
the better of this schedule and `belady` without prefetch (`sim/offline/oracle.py`).
`tests/test_bounds.py` checks both claims on random cases and on the shipped and real traces.

States of a planned load: pending, then issued (`decision` was asked for it: by the prefetch
policy's load from `issue` on, or by the engine's demand load at its step). Any other request
is a broken invariant (an assertion with the load in its message).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import deque
from dataclasses import dataclass

from sim.engine.cache import ABSENT, RESIDENT, ExpertCache


@dataclass
class PlannedLoad:
    key: int
    step: int  # the step that needs it
    victims: tuple[int, ...] | None  # () a free slot; None a bypass (a staging buffer)
    ahead: bool  # issued ahead by the prefetch policy (from `issue` on); False: a demand load at `step`
    issue: int = 0  # the first step whose prefetch hook may issue it
    done: bool = False


def min_loads(ctx, scope: str = "global") -> list[PlannedLoad]:
    """MIN's demand loads (`belady` without prefetch) for `ctx`'s replay, in the engine's order."""
    from policies.cache.belady import Belady

    steps = ctx.steps()
    cache = ExpertCache(ctx.layers, ctx.experts, ctx.cache.capacity_bytes)
    shadow = dataclasses.replace(ctx, cache=cache)
    policy = Belady(Belady.Knobs(scope=scope), shadow)
    nbytes = ctx.preset.expert_bytes
    state = cache.state
    out: list[PlannedLoad] = []
    for s in range(steps.n):
        t, layer, keys, prefill = steps.token[s], steps.layer[s], steps.keys[s], steps.is_prefill[s]
        hits = [k for k in keys if state[k] == RESIDENT]
        if prefill:  # the engine computes a prompt's residents first; its loads pin only themselves
            for k in hits:
                policy.on_access(k, t)
        else:
            cache.pinned.update(keys)
        loaded = []
        for k in [k for k in keys if state[k] == ABSENT]:  # (a prefill's load may evict one of its hits)
            victims = policy.victims(k, nbytes, t, layer, True)
            out.append(PlannedLoad(k, s, None if victims is None else tuple(victims), ahead=False))
            if victims is not None:
                for v in victims:
                    cache.evict(v)
                    policy.on_evict(v)
                cache.begin_load(k, nbytes)
                policy.on_insert(k, t)
                loaded.append(k)
        for k in loaded:  # the step waits for its loads
            cache.finish_load(k)
        for k in ([] if prefill else hits) + loaded:
            policy.on_access(k, t)
        cache.pinned.clear()
    return out


class OfflineSchedule:
    """Loads planned for a whole replay, executed by a prefetch policy (`due`) and a cache policy
    (`decision`) in the engine. `staging_ahead`: how many bypassed loads may wait in staging
    buffers for their step at once."""

    def __init__(self, loads: list[PlannedLoad], staging_ahead: int):
        self.loads = loads
        self.staging_ahead = staging_ahead
        self._by_key: dict[int, deque[int]] = {}
        for i, ld in enumerate(loads):
            self._by_key.setdefault(ld.key, deque()).append(i)
        self._next = 0  # the first load the prefetch policy has not passed
        self._staged: list[int] = []  # steps of the bypassed loads prefetched into staging buffers, a heap

    def due(self, now: int) -> list[int]:
        """Keys to prefetch at the hook of step `now`, in order (the engine issues them in turn)."""
        loads, out, staged = self.loads, [], self._staged
        while staged and staged[0] < now:  # computed at their step: their buffers are free again
            heapq.heappop(staged)
        while self._next < len(loads):
            ld = loads[self._next]
            if ld.done:
                self._next += 1
            elif not ld.ahead:  # a demand load at its step holds the ones after it back
                assert ld.step > now, f"planned demand load {ld} did not happen at its step"
                break
            elif ld.issue > now:
                break
            elif ld.victims is None and len(staged) >= self.staging_ahead:  # no buffer free for it yet
                break
            else:
                if ld.victims is None:
                    heapq.heappush(staged, ld.step)
                out.append(ld.key)
                self._next += 1
        return out

    def decision(self, key: int, now: int) -> list[int] | None:
        """The victims of `key`'s next planned load, issued now ([] a free slot, None a bypass)."""
        pending = self._by_key.get(key)
        assert pending, f"no planned load of expert key {key} is left (step {now})"
        ld = self.loads[pending.popleft()]
        assert not ld.done and ld.issue <= now <= ld.step, f"planned load {ld} issued at step {now}"
        ld.done = True
        return None if ld.victims is None else list(ld.victims)

    @property
    def pending(self) -> int:
        return sum(not ld.done for ld in self.loads)


def conservative(ctx) -> OfflineSchedule:
    """Cao et al.'s Conservative schedule over MIN's loads (module docstring)."""
    steps = ctx.steps()
    loads = min_loads(ctx)
    earliest = 0
    for ld in loads:
        ld.ahead = not steps.is_prefill[ld.step]
        if ld.ahead:
            freed = max((steps.last_use_before(v, ld.step) for v in ld.victims or ()), default=-1) + 1
            ld.issue = max(earliest, freed)
        else:
            ld.issue = ld.step
        earliest = ld.issue
    return OfflineSchedule(loads, staging_ahead=max(0, ctx.staging_buffers - ctx.top_k))
