"""Two independent exact solvers of the most demand hits for a replay's steps (test references).

`exhaustive_hits` searches every eviction sequence the engine can realise: at each step the
step's resident experts are hits and pinned; any subset of its misses may take a slot, each
needing a free slot or a resident the step does not need (several may be evicted at a load; none
without a load); the rest pass through staging buffers. A dynamic program over the sets of
residents, so only for tiny cases.

`milp_hits` is the interval formulation, solved by `scipy.optimize.milp`: keep key k from its use
a to its next use b (binary x), which costs a slot at every step of [a, b]; two kept intervals of
one key meet at a step and cost one slot there (y >= x of each interval covering the step, y in
[0, 1]); at most `capacity` slots per step (per layer with `scope=layer`). Hits = sum of x.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix


def _groups(steps, sizes: list[int] | None, capacity: int):
    """(capacity, [step indices], key filter) per independent scope."""
    if sizes is None:
        return [(capacity, range(steps.n), None)]
    return [(sizes[layer], [s for s in range(steps.n) if steps.layer[s] == layer], layer)
            for layer in range(steps.layers)]


def exhaustive_hits(steps, capacity: int, sizes: list[int] | None = None) -> int:
    total = 0
    for cap, idx, _ in _groups(steps, sizes, capacity):
        best = {frozenset(): 0}
        for s in idx:
            need = set(steps.keys[s])
            nxt: dict[frozenset, int] = {}
            for state, hits in best.items():
                h = hits + len(need & state)
                misses = sorted(need - state)
                cands = sorted(state - need)
                for na in range(len(misses) + 1):
                    for admit in combinations(misses, na):
                        for nx in range(len(cands) + 1) if admit else (0,):
                            if len(state) - nx + na > cap:
                                continue
                            for evict in combinations(cands, nx):
                                new = (state - set(evict)) | set(admit)
                                if nxt.get(new, -1) < h:
                                    nxt[new] = h
            best = nxt
        total += max(best.values())
    return total


def milp_hits(steps, capacity: int, sizes: list[int] | None = None) -> int:
    total = 0
    for cap, idx, layer in _groups(steps, sizes, capacity):
        idx = list(idx)
        pos = {s: i for i, s in enumerate(idx)}  # step -> its row in this scope
        intervals = []  # (key, a, b): rows
        for key, uses in enumerate(steps.uses):
            if layer is not None and key // steps.experts != layer:
                continue
            u = [pos[s] for s in uses if s in pos]
            intervals += [(key, a, b) for a, b in zip(u, u[1:], strict=False)]
        if not intervals:
            continue
        cover: dict[tuple[int, int], list[int]] = {}  # (key, row) -> intervals covering it
        for j, (key, a, b) in enumerate(intervals):
            for r in range(a, b + 1):
                cover.setdefault((key, r), []).append(j)
        ys = list(cover)
        nx, ny = len(intervals), len(ys)
        rows = sum(len(v) for v in cover.values()) + len(idx)
        A = lil_matrix((rows, nx + ny))
        lo, hi = [], []
        r = 0
        for yi, key_row in enumerate(ys):  # y >= x  <=>  x - y <= 0
            for j in cover[key_row]:
                A[r, j], A[r, nx + yi] = 1, -1
                lo.append(-np.inf)
                hi.append(0)
                r += 1
        by_row: dict[int, list[int]] = {}
        for yi, (_, rr) in enumerate(ys):
            by_row.setdefault(rr, []).append(yi)
        for row in range(len(idx)):  # slots used at each step <= capacity
            for yi in by_row.get(row, ()):
                A[r, nx + yi] = 1
            lo.append(-np.inf)
            hi.append(cap)
            r += 1
        c = np.concatenate([-np.ones(nx), np.zeros(ny)])
        integrality = np.concatenate([np.ones(nx), np.zeros(ny)])
        res = milp(c, constraints=LinearConstraint(A.tocsr(), lo, hi), integrality=integrality,
                   bounds=Bounds(0, 1))
        assert res.success, res.message
        total += int(round(-res.fun))
    return total
