"""`belady`: the exact offline optimum of demand hits (MIN) for the engine's step semantics.

Reads the future (a bound, not a deployable policy). Semantics it is exact for (DESIGN 4): at
each step (one MoE layer of a decode token, or of a prompt's prefill batch) the experts the
step needs are all needed at once; those resident are hits, served first and pinned for the
step; every other one is loaded, either into a cache slot (evicting residents the step does not
need) or through a transient staging buffer (bypass: it is not cached); an eviction happens only
when a load needs the room.

Rule (MIN with bypass, decided per step): at the step's first demand load, rank its misses by
their future uses (soonest first) and give each in turn a free slot, or the slot of the resident
whose future uses come latest, if those come later than the miss's own; the rest go through
staging buffers. "Future uses" is the whole sequence of steps that will need the key, compared
lexicographically (the next use, and on a tie the one after, and so on; a key not needed again
comes last). Uses come from `sim.offline.steps`: the gating plan's experts when the gating policy
is stateless (dropped experts are not uses), else the trace's top-k (then the optimum is of that
approximation, and `oracle=true` refuses the combination). Full ties: a miss and a resident keep
the resident; two residents, the higher key goes first; two misses, the lower key is cached first.

Why the whole sequence: several experts are needed at once, so two keys are often next needed at
the same step. There, the one already resident is pinned and goes on for free, while the other is
a miss that must find a slot to stay; so of two keys tied at their next use, keeping the one
needed again sooner afterwards is worth a hit (comparing the next use alone, as classic MIN does,
loses 0-1.1% of the hits on real Mixtral routing). Proof sketch: in an optimal run that keeps a
key x where this rule keeps y (y's future lexicographically sooner), swap the two keys' roles up
to the first step where their futures differ: every step before it needs both or neither, so the
hits are the same; at that step y is needed and x is not, so the swapped run gains y's hit there
and gives up at most x's at its next use. Checked, not only argued: `tests/test_belady_exact.py`
compares it with an integer program and with an exhaustive search of every eviction sequence
the engine can realise, on hundreds of random cases.

A prefetch (with a prefetch policy) gets a free slot, or the furthest resident's slot if that
one is needed later than the prefetched expert, else it is skipped. With the `oracle` prefetch
policy, `follow(schedule)` makes it evict exactly as that offline schedule planned.

Cost: a heap of residents by future uses per scope; O(log C) per miss (lazy deletion: an entry
is stale when its key left or was used since). Entries compare as tuples of the next two uses,
and only on a tie of both walk the rest of the two sequences (`_Later`). `scope=layer` restricts victims to the
requesting layer's uniform partition; default `global`.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass

from policies.base import CachePolicy, Context
from policies.cache.partition import uniform_sizes
from policies.registry import CACHE
from sim.engine.cache import ABSENT, LOADING
from sim.errors import UserError
from sim.offline.steps import NEVER

_UNPLANNED = object()


@CACHE.register("belady")
class Belady(CachePolicy):
    reads_replay_future = True  # the future of the replay's steps
    @dataclass
    class Knobs:
        scope: str = "global"

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.scope not in ("layer", "global"):
            raise UserError(f"cache.scope must be 'layer' or 'global', got {knobs.scope!r}")
        self.steps = ctx.steps()
        L, E = ctx.layers, ctx.experts
        self.E = E
        self.per_layer = knobs.scope == "layer"
        self.sizes = uniform_sizes(ctx.capacity_slots, L) if self.per_layer else None
        #: per scope: residents as (-next use, -use after, _Later(the rest), -key, key, index of the
        #: next use): a max-heap by future uses (lazy deletion)
        self.heaps: list[list[tuple]] = [[] for _ in range(L if self.per_layer else 1)]
        #: the index into `steps.uses[key]` of each resident's next use, as its live heap entry holds it
        self.pos = [0] * (L * E)
        self._step = -1  # the step whose misses `_decisions` answers
        self._decisions: dict[int, list[int] | None] = {}
        self.schedule = None  # an offline schedule to follow (`follow`)

    # ------------------------------------------------------------------ bookkeeping
    def follow(self, schedule) -> None:
        """Evict exactly as `schedule` (`sim.offline.schedule.OfflineSchedule`) planned."""
        self.schedule = schedule

    def _step_of(self, key: int, t: int) -> int:
        """The step at which `key` is accessed or inserted at token t: its own layer's."""
        return self.steps.step_of(t, key // self.E)

    def _future(self, key: int, after: int) -> tuple:
        """The key's uses from step `after` on, as a tuple that ranks a sooner future first."""
        uses = self.steps.uses[key]
        i = bisect.bisect_left(uses, after)
        n = len(uses)
        return uses[i] if i < n else NEVER, uses[i + 1] if i + 1 < n else NEVER, _Sooner(uses, i + 2), key

    def _push(self, key: int, after: int) -> None:
        uses = self.steps.uses[key]
        i = bisect.bisect_left(uses, after)
        n = len(uses)
        self.pos[key] = i
        entry = (-(uses[i] if i < n else NEVER), -(uses[i + 1] if i + 1 < n else NEVER), _Later(uses, i + 2),
                 -key, key, i)
        heapq.heappush(self.heaps[key // self.E if self.per_layer else 0], entry)

    def on_insert(self, key: int, t: int) -> None:
        if self.schedule is None:
            self._push(key, self._step_of(key, t))  # loading for its step: pinned; its later uses come on access

    def on_access(self, key: int, t: int) -> None:
        if self.schedule is None:
            self._push(key, self._step_of(key, t) + 1)

    # ------------------------------------------------------------------ decisions
    def _free_slots(self, layer: int) -> int:
        cache = self.ctx.cache
        free = self.ctx.capacity_slots - cache.slots_used
        if self.per_layer:
            free = min(free, self.sizes[layer] - cache.per_layer[layer])
        return free

    def _furthest(self, heap: list) -> int | None:
        """The evictable resident needed furthest in the future (its entry stays on top), or None."""
        cache = self.ctx.cache
        state, pinned, pos = cache.state, cache.pinned, self.pos
        held, found = [], None
        while heap:
            k, i = heap[0][4], heap[0][5]
            if state[k] == ABSENT or pos[k] != i:  # stale: evicted, or used since
                heapq.heappop(heap)
            elif state[k] == LOADING or k in pinned:  # not evictable now, but later
                held.append(heapq.heappop(heap))
            else:
                found = k
                break
        for entry in held:
            heapq.heappush(heap, entry)
        return found

    def _plan_step(self, s: int) -> dict[int, list[int] | None]:
        """Where each miss of step `s` goes: [] a free slot, [victim], or None (a staging buffer)."""
        steps, state = self.steps, self.ctx.cache.state
        misses = [k for k in steps.keys[s] if state[k] == ABSENT]
        out: dict[int, list[int] | None] = {}
        if not misses:
            return out
        layer = steps.layer[s]
        heap = self.heaps[layer if self.per_layer else 0]
        free = self._free_slots(layer)
        bypass = False
        for m in sorted(misses, key=lambda k: self._future(k, s + 1)):
            if bypass:
                out[m] = None
            elif free > 0:
                out[m] = []
                free -= 1
            elif (v := self._displaces(heap, m, s)) is not None:
                out[m] = [v]
            else:  # every later miss is needed even later: none displaces a resident
                out[m] = None
                bypass = True
        return out

    def _displaces(self, heap: list, key: int, s: int) -> int | None:
        """The resident whose slot `key` (needed from step s + 1 on) should take, or None; its heap
        entry is popped (it leaves when the load evicts it)."""
        v = self._furthest(heap)
        if v is None:
            return None
        mine = self._future(key, s + 1)
        top = heap[0]
        theirs = (-top[0], -top[1], _Sooner(top[2].uses, top[2].i), v)
        if theirs[:3] > mine[:3]:  # v's future is later (a full tie keeps the resident)
            heapq.heappop(heap)
            return v
        return None

    def _restore(self) -> None:
        """Victims planned for loads that never came (the engine did not load that miss) stay."""
        for decision in self._decisions.values():
            for v in decision or ():
                if self.ctx.cache.state[v] != ABSENT:
                    uses = self.steps.uses[v]
                    self._push(v, uses[self.pos[v]] if self.pos[v] < len(uses) else NEVER)
        self._decisions = {}

    def victims(self, key: int, nbytes: float, t: int, layer: int, demand: bool = True) -> list[int] | None:
        s = self.steps.step_of(t, layer)  # the step being simulated
        if self.schedule is not None:
            return self.schedule.decision(key, s)
        if demand:
            if s != self._step:
                self._restore()
                self._decisions = self._plan_step(s)
                self._step = s
            decision = self._decisions.pop(key, _UNPLANNED)
            if decision is not _UNPLANNED:
                return decision
        # a prefetch (or a load the step's plan did not foresee): MIN's rule for this one key
        layer = key // self.E
        if self._free_slots(layer) > 0:
            return []
        v = self._displaces(self.heaps[layer if self.per_layer else 0], key, s)
        return None if v is None else [v]


class _Sooner:
    """The uses of a key from index `i` on, compared lexicographically; sooner is smaller, and a
    sequence that ends compares as if it went on with NEVER (later than any step)."""

    __slots__ = ("uses", "i")

    def __init__(self, uses: list[int], i: int):
        self.uses, self.i = uses, i

    def _cmp(self, other: _Sooner) -> int:
        a, b, i, j = self.uses, other.uses, self.i, other.i
        na, nb = len(a), len(b)
        while i < na and j < nb:
            if a[i] != b[j]:
                return -1 if a[i] < b[j] else 1
            i += 1
            j += 1
        return (i >= na) - (j >= nb)  # the one that ran out is later

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Sooner) and self._cmp(other) == 0

    def __lt__(self, other: _Sooner) -> bool:
        return self._cmp(other) < 0

    def __gt__(self, other: _Sooner) -> bool:
        return self._cmp(other) > 0


class _Later(_Sooner):
    """As `_Sooner`, ordered the other way (a later future first, for the max-heap of residents)."""

    __slots__ = ()

    def __lt__(self, other: _Sooner) -> bool:
        return self._cmp(other) > 0

    def __gt__(self, other: _Sooner) -> bool:
        return self._cmp(other) < 0
