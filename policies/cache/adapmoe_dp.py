"""`adapmoe_dp`: per-layer LRU partitions whose sizes come from AdapMoE's dynamic programme.

Reference section 3. With N experts per layer, s slots in a layer, prefetch accuracy a_l and
single-expert share r_l, the expected demand loads of layer l per token under uniform routing is

    f(l, s) = r_l * (1 - s/N) * (1 - a_l)
              + (1 - r_l) * [2 * P2both * (1 - a_l) + P2both * a_l + P2one * (1 - a_l)]
    P2both = (N-s)(N-s-1) / (N(N-1)),  P2one = 2 s (N-s) / (N(N-1))

(for top-k != 2 the two-expert term becomes k * (1 - s/N) * (1 - a_l)), and the sizes minimise
sum_l f(l, s_l) subject to sum_l s_l = C and s_l >= `min_slots` by `dp_sizes` (O(L * C * N)).
Ties: the DP keeps the first minimum found scanning s upwards. With AdapMoE's published a_l, r_l,
C = 64 and min_slots = 1 it gives their example [8, 4, 3, 3, 3, 3, 3, 2 x 12, 1 x 13].

Knobs: `fit` = `trace` (a_l = pre-gating top-1 accuracy of the trace's `pregate_1` for layer l
(without pre-gating logits: the modelled predictor's, i.e. the published accuracy),
r_l = single-expert share of the gating plan, both measured on the replayed trace), `published`
(AdapMoE's hard-coded Mixtral-8x7B a_l and r_l); `miss_model` = `uniform` (the formula above,
as published) or `trace` (our improvement: f(l, s) = measured per-layer LRU misses per token for a
partition of s slots, from the trace's reuse, times (1 - a_l) for prefetchable layers).
Inside each partition: LRU (`policies/cache/lru.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context
from policies.cache.lru import LRU
from policies.published import published
from policies.registry import CACHE
from sim.errors import UserError


def dp_sizes(cost: np.ndarray, capacity: int) -> list[int]:
    """cost [L, N+1] (cost of giving layer l s slots) -> sizes minimising the sum, sum = capacity.

    Infeasible (capacity > L * N) raises ValueError. Ties: the first minimum scanning s upwards.
    """
    L, n1 = cost.shape
    N = n1 - 1
    if capacity > L * N or capacity < 0:
        raise ValueError(f"capacity {capacity} outside 0..{L * N}")
    INF = float("inf")
    dp = np.full((L + 1, capacity + 1), INF)
    choice = np.zeros((L + 1, capacity + 1), dtype=np.int64)
    dp[0, 0] = 0.0
    for i in range(1, L + 1):
        for j in range(capacity + 1):
            best, arg = INF, 0
            for s in range(min(N, j) + 1):
                v = dp[i - 1, j - s] + cost[i - 1, s]
                if v < best - 1e-15:
                    best, arg = v, s
            dp[i, j], choice[i, j] = best, arg
    sizes, j = [], capacity
    for i in range(L, 0, -1):
        sizes.append(int(choice[i, j]))
        j -= sizes[-1]
    return sizes[::-1]


def uniform_cost(a: np.ndarray, r: np.ndarray, N: int, k: int = 2) -> np.ndarray:
    """AdapMoE's f(l, s) for s = 0..N: [L, N+1]."""
    s = np.arange(N + 1)[None, :].astype(float)
    a, r = a[:, None], r[:, None]
    p1miss = 1 - s / N
    if k == 2:
        both = (N - s) * (N - s - 1) / (N * (N - 1))
        one = 2 * s * (N - s) / (N * (N - 1))
        two = 2 * both * (1 - a) + both * a + one * (1 - a)
    else:
        two = k * p1miss * (1 - a)
    return r * p1miss * (1 - a) + (1 - r) * two


def lru_miss_curve(ids: np.ndarray, N: int) -> np.ndarray:
    """Per-layer LRU misses per token for s = 0..N slots, from a trace's reuse: [L, N+1].

    ids [T, L, k] (-1 = not run). A layer's partition is an LRU stack; an access at stack
    distance d (0 = most recent) hits iff d < s.
    """
    T, L, _ = ids.shape
    miss = np.zeros((L, N + 1))
    for layer in range(L):
        stack: list[int] = []
        hist = np.zeros(N + 1)
        for t in range(T):
            row = [int(e) for e in ids[t, layer] if e >= 0]
            for e in row:
                d = stack.index(e) if e in stack else N  # N: never seen = miss at any size
                hist[min(d, N)] += 1
            for e in row:  # the row's experts become most recent (in rank order)
                if e in stack:
                    stack.remove(e)
                stack.insert(0, e)
        # misses with s slots = accesses at distance >= s
        miss[layer] = np.array([hist[s:].sum() for s in range(N + 1)]) / max(T, 1)
    return miss


@CACHE.register("adapmoe_dp")
class AdapMoEDP(LRU):
    @dataclass
    class Knobs:
        fit: str = "trace"  # trace | published
        miss_model: str = "uniform"  # uniform (published) | trace (measured reuse)
        min_slots: int = 1  # every layer keeps at least this many slots (1 reproduces AdapMoE's example)

    def __init__(self, knobs: Knobs, ctx: Context):
        if knobs.fit not in ("trace", "published") or knobs.miss_model not in ("uniform", "trace"):
            raise UserError("cache.fit must be trace|published and cache.miss_model uniform|trace")
        L, N, k = ctx.layers, ctx.experts, ctx.top_k
        plan = ctx.gating_plan
        ids = plan.ids if plan is not None else ctx.trace.experts.astype(np.int64)
        decode = ctx.trace.is_decode
        if knobs.fit == "published":
            pub = published("adapmoe", ctx.preset.name)
            a = np.asarray(pub["prefetch_accuracy"], float)
            r = np.asarray(pub["single_expert_share"], float)
        else:
            a = prefetch_accuracy(ctx)
            self.in_sample_fit = "a_l and r_l measured on the replayed trace (cache.fit=trace)"
            r = ((ids[decode] >= 0).sum(-1) == 1).mean(0) if decode.any() else np.zeros(L)
        if knobs.miss_model == "uniform":
            cost = uniform_cost(a, r, N, k)
        else:
            cost = lru_miss_curve(ids[decode], N) * (1 - a)[:, None]
        if not 0 <= knobs.min_slots <= N or knobs.min_slots * L > ctx.capacity_slots:
            raise UserError(f"cache.min_slots={knobs.min_slots} does not fit {ctx.capacity_slots} slots over {L} layers")
        cost = cost.copy()
        cost[:, : knobs.min_slots] = np.inf
        self.a, self.r, self.cost = a, r, cost
        self.dp = dp_sizes(cost, min(ctx.capacity_slots, L * N))
        LRU.__init__(self, LRU.Knobs(scope="layer", sizes=self.dp), ctx)


def prefetch_accuracy(ctx: Context) -> np.ndarray:
    """a_l: share of decode tokens whose pregate_1 top-1 for layer l (made at l-1) is active at l.

    A trace without pre-gating logits is replayed with the modelled predictor, whose accuracy is
    the published one (when shipped for the preset): that is then a_l; else 0."""
    tr = ctx.trace
    L = ctx.layers
    a = np.zeros(L)
    if 1 not in tr.pregate:
        try:
            return np.asarray(published("adapmoe", ctx.preset.name)["prefetch_accuracy"], float)
        except UserError:
            return a
    dec = tr.is_decode
    pred = np.argmax(tr.pregate[1][dec], axis=-1)  # [T, L]: prediction for layer l+1 made at l
    true = tr.experts[dec]  # [T, L, k]
    hit = (true[:, 1:, :] == pred[:, :-1, None]).any(-1)  # [T, L-1]
    a[1:] = hit.mean(0) if hit.size else 0.0
    return a
