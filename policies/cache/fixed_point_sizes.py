"""`fixed_point_sizes`: per-layer LRU/LFU partitions sized by a marginal-gain search on miss curves.

The sizes equalise the marginal value of a slot across layers: a fixed point of single-slot moves
on each layer's measured miss curve, from the uniform split.

Source: the marginal-utility partitioning of shared caches (utility-based cache partitioning,
Qureshi & Patt, MICRO 2006: give each slot where it removes the most misses, from per-partition
miss curves), applied to MoE expert caches as per-layer budgets (AdapMoE, 2024, sizes them by a
DP on a modelled miss function: `adapmoe_dp`). Ours: the curves are measured per layer by
replaying the layer's own expert sequence through the inner policy, and the sizes are a local
optimum of single-slot moves rather than a DP.

1. Miss curves. For each layer l and s = 0..E slots, m_l(s) = the demand loads of layer l over the
   profile's decode tokens (in trace order, one stream) when its partition of s slots runs the
   inner policy (`inner=lru|lfu`, as `policies/cache/lru.py` / `lfu.py` do in the engine): a
   step's experts are all pinned for the step; a resident one is a hit; each miss, in rank order,
   takes a free slot, else evicts the inner policy's victim among the step's non-active
   residents, else bypasses the cache (a staging buffer, not cached and, as in the engine, not
   counted as an access). Prefetching is not modelled. `self.miss_curve` [L, E+1] (counts).
   Computed lazily (`MissCurves`): the search replays only the (layer, size) pairs it reads, each
   once (its sizes and their neighbours, a few per layer, not all E+1); `self.miss_curve` replays
   the rest when asked. (One pass over LRU stack distances would give every size at once, but
   these rules break LRU's inclusion property: a step's hits go to the MRU end before its loads,
   and which experts hit depends on the size, so a smaller partition can hold an expert a larger
   one evicted.) LFU's victim is taken from a heap of (uses, last use) with stale entries skipped.
2. Search. Start from the uniform split (`partition.uniform_sizes` of min(C, L * E)). While a move
   lowers the total misses and fewer than `max_iters` moves were made: move one slot from donor d
   to receiver r (r != d, s_r < E, s_d > `min_slots`), the pair maximising
   gain_r - loss_d = [m_r(s_r) - m_r(s_r + 1)] - [m_d(s_d - 1) - m_d(s_d)]
   (the layer whose marginal gain is largest takes from the one whose marginal loss is smallest;
   the pair is chosen jointly, so a layer that would be both is handled); only a strictly
   positive value is a move, so the total strictly falls and the search ends. Ties: the lower
   receiver index, then the lower donor index. At the end no single move lowers the total
   (a fixed point; `self.iterations` moves were made). `self.uniform_misses`, `self.total_misses`.
3. Run: the inner policy, `scope=layer`, with those sizes (`self.sizes`).

vs `adapmoe_dp miss_model=trace`: that policy minimises sum_l f_l(s_l) exactly by a DP over the
same kind of curves (LRU stack distances, scaled by each layer's (1 - prefetch accuracy)). When
every m_l is convex (diminishing gains) the fixed point here is that global optimum; when a curve
is not (a layer whose second slot helps more than its first, common with top-2 routing), the
search can stop at a local optimum the DP would escape. Ours adds LFU curves, the engine's pinning
and bypass in the curve (which a stack-distance curve ignores) and no prefetch factor.

`fit=trace` (default) measures the curves on the replayed trace itself (the gating plan's experts
when the gating policy is stateless, else the trace's top-k; its first `engine.max_tokens` decode
tokens when the replay stops there), as `adapmoe_dp fit=trace` does:
in-sample sizing, an optimistic upper estimate of what a deployed sizing achieves. `fit=FIT_DIR`
measures them on a profile trace (`policies.fit.fit_trace`, which refuses the replayed trace):
out of sample.

Errors (`UserError`, naming the knob): `inner` not lru|lfu; `min_slots` outside 0..E or more than
C / L per layer; a `fit` folder that is the replayed trace or has another model shape.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from policies.base import CachePolicy, Context
from policies.cache.lfu import LFU
from policies.cache.lru import LRU
from policies.cache.partition import uniform_sizes
from policies.fit import fit_trace
from policies.registry import CACHE
from sim.errors import UserError

INNER = {"lru": LRU, "lfu": LFU}


def layer_misses(rows: list[list[int]], slots: int, inner: str) -> int:
    """Demand loads of one layer's steps `rows` (expert ids in rank order) in a partition of
    `slots` slots run by `inner` (lru|lfu), with the engine's pinning and bypass (module doc)."""
    misses = 0
    if inner == "lru":
        order: OrderedDict[int, None] = OrderedDict()  # residents, least recent first
        for row in rows:
            hits = [e for e in row if e in order]
            loaded = []
            for e in row:
                if e in order:
                    continue
                misses += 1
                if len(order) >= slots:
                    victim = next((k for k in order if k not in row), None)
                    if victim is None:
                        continue  # bypass: every resident is active (or the partition is empty)
                    del order[victim]
                if slots > 0:
                    order[e] = None  # insertion counts as a use
                    loaded.append(e)
            for e in hits + loaded:  # computed: residents first, then the loads
                order.move_to_end(e)
        return misses
    # LFU: the victim is the non-active resident of fewest uses, then the least recent (each
    # resident's `last` is a distinct clock value, so that is the whole order); a heap of
    # (uses, last, expert) entries, the stale ones (an expert used or evicted since) skipped
    freq: dict[int, int] = {}
    last: dict[int, int] = {}
    clock = 0
    resident: set[int] = set()
    heap: list[tuple[int, int, int]] = []
    for row in rows:
        hits = [e for e in row if e in resident]
        loaded = []
        for e in row:
            if e in resident:
                continue
            misses += 1
            if len(resident) >= slots:
                victim = None
                held = []  # live entries of active experts, put back after
                while heap:
                    f, c, k = heap[0]
                    if k not in resident or last[k] != c or freq.get(k, 0) != f:
                        heapq.heappop(heap)  # stale
                        continue
                    if k in row:
                        held.append(heapq.heappop(heap))
                        continue
                    victim = k
                    heapq.heappop(heap)
                    break
                for entry in held:
                    heapq.heappush(heap, entry)
                if victim is None:
                    continue
                resident.discard(victim)
            if slots > 0:
                resident.add(e)
                clock += 1
                last[e] = clock
                heapq.heappush(heap, (freq.get(e, 0), clock, e))
                loaded.append(e)
        for e in hits + loaded:
            freq[e] = freq.get(e, 0) + 1
            clock += 1
            last[e] = clock
            heapq.heappush(heap, (freq[e], clock, e))
    return misses


def layer_rows(ids: np.ndarray, layer: int) -> list[list[int]]:
    """Layer `layer`'s steps of ids [T, L, k] (-1 = not run): the expert ids of each row that runs one."""
    rows = [[int(e) for e in r if e >= 0] for r in ids[:, layer].tolist()]
    return [r for r in rows if r]


class MissCurves:
    """[L, E+1] demand loads of each layer for s = 0..E slots (`layer_misses`), each computed on
    first use and kept: `curve[layers, sizes]` (integer arrays, as `fixed_point` reads it) replays
    only the (layer, size) pairs not yet known; `np.asarray(curve)` (or any other index) computes
    them all."""

    def __init__(self, ids: np.ndarray, experts: int, inner: str):
        self.ids = np.asarray(ids)
        self.inner = inner
        L = self.ids.shape[1]
        self.shape = (L, experts + 1)
        self._rows: list[list[list[int]] | None] = [None] * L
        self._known: dict[tuple[int, int], float] = {}

    def value(self, layer: int, slots: int) -> float:
        got = self._known.get((layer, slots))
        if got is None:
            rows = self._rows[layer]
            if rows is None:
                rows = self._rows[layer] = layer_rows(self.ids, layer)
            got = self._known[(layer, slots)] = float(layer_misses(rows, slots, self.inner))
        return got

    @property
    def computed(self) -> int:
        """How many (layer, size) pairs were replayed."""
        return len(self._known)

    def full(self) -> np.ndarray:
        L, n1 = self.shape
        return np.array([[self.value(layer, s) for s in range(n1)] for layer in range(L)], dtype=float)

    def __array__(self, dtype=None, copy=None):
        out = self.full()
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, index):
        if isinstance(index, tuple) and len(index) == 2:
            rows, cols = (np.asarray(i) for i in index)
            if rows.dtype.kind in "iu" and cols.dtype.kind in "iu":
                rows, cols = np.broadcast_arrays(rows, cols)
                out = np.array([self.value(int(r), int(c)) for r, c in zip(rows.ravel().tolist(),
                                                                            cols.ravel().tolist(), strict=True)])
                return out.reshape(rows.shape)
        return self.full()[index]


def miss_curves(ids: np.ndarray, experts: int, inner: str) -> np.ndarray:
    """[L, E+1] demand loads of each layer for s = 0..E slots; ids [T, L, k] (-1 = not run)."""
    return MissCurves(ids, experts, inner).full()


def fixed_point(curve: np.ndarray, capacity: int, min_slots: int, max_iters: int) -> tuple[list[int], int]:
    """(sizes, moves made): the slot-moving search of the module docstring on curve [L, E+1]."""
    L, n1 = curve.shape
    E = n1 - 1
    sizes = np.array(uniform_sizes(min(capacity, L * E), L), dtype=np.int64)
    rows = np.arange(L)
    moves = 0
    while moves < max_iters:
        up = np.minimum(sizes + 1, E)
        down = np.maximum(sizes - 1, 0)
        gain = np.where(sizes < E, curve[rows, sizes] - curve[rows, up], -np.inf)
        loss = np.where(sizes > min_slots, curve[rows, down] - curve[rows, sizes], np.inf)
        delta = gain[:, None] - loss[None, :]
        np.fill_diagonal(delta, -np.inf)
        best = int(np.argmax(delta))  # row-major: the lowest receiver, then the lowest donor, on ties
        r, d = divmod(best, L)
        if not delta[r, d] > 0:
            break
        sizes[r] += 1
        sizes[d] -= 1
        moves += 1
    return [int(s) for s in sizes], moves


@CACHE.register("fixed_point_sizes")
class FixedPointSizes(CachePolicy):
    @dataclass
    class Knobs:
        inner: str = "lru"  # lru | lfu: the policy inside each partition (and the one the curves measure)
        fit: str = "trace"  # trace (the replayed trace: in-sample) | FIT_DIR (a profile trace)
        min_slots: int = 1  # every layer keeps at least this many slots
        max_iters: int = 100000  # cap on slot moves (0: the uniform split)

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.inner not in INNER:
            raise UserError(f"cache.inner must be lru or lfu, got {knobs.inner!r}")
        L, E, C = ctx.layers, ctx.experts, ctx.capacity_slots
        if not 0 <= knobs.min_slots <= E or knobs.min_slots * L > C:
            raise UserError(f"cache.min_slots={knobs.min_slots} does not fit: it must be 0..{E} and at most "
                            f"{C // L} for {C} slots over {L} layers")
        if knobs.fit == "trace":
            plan = ctx.gating_plan
            ids = plan.ids if plan is not None else ctx.trace.experts.astype(np.int64)
            ids = ids[ctx.trace.is_decode]
            if ctx.max_tokens:  # the replay stops there (`engine.max_tokens`): the rows it replays
                ids = ids[: ctx.max_tokens]
            self.in_sample_fit = "sizes searched on the replayed trace's miss curves (give cache.fit=FIT_DIR)"
        else:
            fit = fit_trace(knobs.fit, ctx, "cache.fit")
            ids = fit.experts[fit.is_decode].astype(np.int64)
        self.curves = MissCurves(np.asarray(ids), E, knobs.inner)  # replayed for the sizes the search reads
        rows = np.arange(L)
        uniform = np.array(uniform_sizes(min(C, L * E), L))
        self.uniform_misses = float(self.curves[rows, uniform].sum())
        self.sizes, self.iterations = fixed_point(self.curves, C, int(knobs.min_slots), int(knobs.max_iters))
        self.total_misses = float(self.curves[rows, np.array(self.sizes)].sum())
        cls = INNER[knobs.inner]
        self.inner = cls(cls.Knobs(scope="layer", sizes=self.sizes), ctx)
        # the inner policy's methods, bound here: no extra call on the engine's hot path
        self.on_access = self.inner.on_access
        self.on_insert = self.inner.on_insert
        self.on_evict = self.inner.on_evict
        self.victims = self.inner.victims
        self.observes_steps = self.inner.observes_steps
        self.on_step = self.inner.on_step

    @property
    def miss_curve(self) -> np.ndarray:
        """[L, E+1] the whole curves (every size replayed, once; the search itself reads only a few)."""
        return self.curves.full()
