"""`arc`: Adaptive Replacement Cache, per layer (as Fate uses it) or over the whole cache.

Source: N. Megiddo and D. S. Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache",
FAST 2003 (the algorithm of its Fig. 4); used per MoE layer for expert caching by Fate (2025).

Each scope (a layer's partition of `c` slots with `scope=layer`, the whole cache of
`c = capacity_slots` with `scope=global`) keeps four LRU lists, least recent first:
T1 (resident, seen once recently), T2 (resident, seen at least twice), B1 and B2 (ghosts: keys
evicted from T1 and T2, without data), and an adaptive target `p` (0 <= p <= c) for the size of
T1. Invariants, as ARC's: |T1| + |B1| <= c and |T1| + |T2| + |B1| + |B2| <= 2c.

ARC's "request for x" mapped onto the contract:
- a hit (`on_access` of a resident that was used before): x moves to T2's MRU end (from T1 or T2);
- a miss is `victims` (the engine asks for room) then `on_evict` (the victim) then `on_insert(x)`
  (the load took a slot) then `on_access(x)` once the load is in. The insert *is* the request:
  - x in B1 (a ghost hit): p = min(c, p + max(1, |B2| / |B1|)); x leaves B1 for T2's MRU end;
  - x in B2: p = max(0, p - max(1, |B1| / |B2|)); x leaves B2 for T2's MRU end;
  - x new: as ARC's case IV, first the LRU ghost of B1 is dropped when |T1| + |B1| >= c (when B1
    is empty there, T1 held all c slots and `victims` took T1's LRU, which is dropped now, as
    ARC drops it without a ghost), else the LRU ghost of B2 when the four lists hold >= 2c;
    x goes to T1's MRU end.
  The first `on_access` after an insert belongs to the same request (it does not promote x).
- `victims` is ARC's REPLACE(x, p): evict from T1 if |T1| >= 1 and (|T1| > p, or x in B2 and
  |T1| == p), else from T2; the victim moves to the MRU end of B1 or B2 (`on_evict`). ARC adapts
  p before REPLACE: `victims` uses the p that x's ghost hit will give (computed with the ghost
  list lengths of that moment), and `on_insert` commits that value; `victims` changes nothing.

Simplifications and choices (ours):
- A slot is one expert: ARC counts entries, not bytes. When the partition or cache has room,
  `victims` returns [] without REPLACE (ARC's cache is then not full). With `scope=global` a load
  needing more bytes than are free gets REPLACE repeated, as if each victim had left its list.
- Only `ctx.cache.evictable(k)` residents may go (not loading, not pinned by the current layer):
  REPLACE takes the least recent evictable key of the list it names, else of the other list;
  None when neither has one (the engine then stages a demand load, or skips a prefetch). The
  list lengths REPLACE compares count every resident, evictable or not.
- A prefetch insert counts as the request for its key at the moment of the insert (a ghost hit
  adapts p as a demand miss would); its first use is that request, not a hit. An unused
  prefetch that is evicted, and a prefetch the engine cuts short (told as an eviction too: the
  contract does not tell them apart), leave a ghost like any other evicted key.
- A load that goes to a staging buffer (no slot) is invisible to the policy (no insert, no access).
- Ties do not arise: every list is ordered by recency. p is a float, as in the paper (|B2|/|B1|
  need not be whole).

Errors: `cache.scope` other than layer|global and bad `cache.sizes` are `UserError`s naming the knob.
Cost: O(1) per access and insert; a miss scans its list from the LRU end past unevictable keys.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from policies.base import CachePolicy, Context
from policies.cache.partition import layer_partitions
from policies.registry import CACHE
from sim.engine.cache import RESIDENT

#: which list a key is in
NONE, T1, T2, B1, B2 = 0, 1, 2, 3, 4


class _Scope:
    """ARC's state for one scope: its four lists (OrderedDicts, least recent first), c and p."""

    __slots__ = ("c", "p", "t1", "t2", "b1", "b2")

    def __init__(self, c: int):
        self.c = c
        self.p = 0.0
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()

    def adapted_p(self, where: int) -> float:
        """p after a ghost hit in B1 or B2 (`where`), with the list lengths of now."""
        b1, b2 = len(self.b1), len(self.b2)
        if where == B1:
            return min(float(self.c), self.p + max(1.0, b2 / b1))
        return max(0.0, self.p - max(1.0, b1 / b2))


@CACHE.register("arc")
class ARC(CachePolicy):
    @dataclass
    class Knobs:
        scope: str = "layer"  # "layer" (per-layer partitions, ARC in each) or "global" (one ARC)
        sizes: list[int] | None = field(default=None)  # per-layer slots (scope=layer); default uniform

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        self.sizes = layer_partitions(knobs, ctx)
        self.per_layer = self.sizes is not None
        self.E = E = ctx.experts
        L = ctx.layers
        self.scopes = [_Scope(c) for c in self.sizes] if self.per_layer else [_Scope(int(ctx.capacity_slots))]
        #: key -> its scope's state
        self.scope_of = [self.scopes[key // E if self.per_layer else 0] for key in range(L * E)]
        self.where = [NONE] * (L * E)  # key -> the list it is in
        self.fresh: set[int] = set()  # inserted, not used yet: the next access is the same request
        self._memo: tuple[int, float] | None = None  # (key, p after its ghost hit) from `victims`

    # ------------------------------------------------------------------ what ARC is told
    def on_access(self, key: int, t: int) -> None:
        if key in self.fresh:  # the use of the load that inserted it: the same request
            self.fresh.discard(key)
            return
        w = self.where[key]
        if w == T2:
            self.scope_of[key].t2.move_to_end(key)
        elif w == T1:  # seen again: frequent
            s = self.scope_of[key]
            del s.t1[key]
            s.t2[key] = None
            self.where[key] = T2

    def on_insert(self, key: int, t: int) -> None:
        s, w = self.scope_of[key], self.where[key]
        memo, self._memo = self._memo, None
        if w == B1 or w == B2:  # a ghost hit: adapt p (the value `victims` used), x to T2
            s.p = memo[1] if memo is not None and memo[0] == key else s.adapted_p(w)
            del (s.b1 if w == B1 else s.b2)[key]
            s.t2[key] = None
            self.where[key] = T2
        elif w == NONE:  # new: trim the ghosts (ARC's case IV), x to T1
            if len(s.t1) + len(s.b1) >= s.c:
                if s.b1:
                    self.where[s.b1.popitem(last=False)[0]] = NONE
            elif len(s.t1) + len(s.t2) + len(s.b1) + len(s.b2) >= 2 * s.c and s.b2:
                self.where[s.b2.popitem(last=False)[0]] = NONE
            s.t1[key] = None
            self.where[key] = T1
        # (w in T1/T2: inserted while tracked as resident; cannot happen, nothing to do)
        self.fresh.add(key)

    def on_evict(self, key: int) -> None:
        self.fresh.discard(key)
        s, w = self.scope_of[key], self.where[key]
        if w == T1:
            del s.t1[key]
            s.b1[key] = None
            self.where[key] = B1
        elif w == T2:
            del s.t2[key]
            s.b2[key] = None
            self.where[key] = B2

    # ------------------------------------------------------------------ REPLACE
    def victims(self, key: int, nbytes: float, t: int, layer: int, demand: bool = True) -> list[int] | None:
        cache = self.ctx.cache
        s, w = self.scope_of[key], self.where[key]
        if self.per_layer:
            layer = key // self.E
            if cache.per_layer[layer] < self.sizes[layer] and cache.capacity_bytes - cache.used_bytes >= nbytes:
                return []
            need = 1
        else:
            if cache.free_bytes() >= nbytes:
                return []
            need = nbytes - cache.free_bytes()
        if w == B1 or w == B2:
            p = s.adapted_p(w)
            self._memo = (key, p)
        else:
            p = s.p
        state, pinned = cache.state, cache.pinned
        n1 = len(s.t1)  # |T1| as REPLACE sees it (shrinks as victims leave it)
        out: list[int] = []
        taken: set[int] = set()
        while need > 0:
            from_t1 = n1 >= 1 and (n1 > p or (w == B2 and n1 == p))
            first, second = (s.t1, s.t2) if from_t1 else (s.t2, s.t1)
            v = None
            for lst in (first, second):
                for k in lst:
                    if state[k] == RESIDENT and k not in pinned and k not in taken:
                        v = k
                        break
                if v is not None:
                    break
            if v is None:
                return None
            out.append(v)
            if self.per_layer:
                return out
            taken.add(v)
            if v in s.t1:
                n1 -= 1
            need -= cache.size_bytes[v]
        return out
