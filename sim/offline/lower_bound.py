"""A proven lower bound on mean TPOT for a trace, hardware, cache size, gating and placement.

No schedule of prefetches, evictions and placements that the engine can run decodes faster.
Mean TPOT is the sum over sequences of their decode time (from the start of a sequence's first
decode token to the end of its last) over the decode tokens, so it is enough to bound each
sequence's decode window. Within a window of steps 0..n-1 (one per (token, layer)):

1. *Compute.* Steps run in order on the compute stream, and step j needs at least
   `c_j = attention_j + (the device's share of its experts)`: `n_j` expert computations at
   `e` each, or, where the placement may compute experts on the CPU (which runs beside the
   device but only once the step has gated), `min over d of max(d * e, (n_j - d) * e_cpu)`.
   Uncontended times: sharing memory bandwidth with copies only slows compute.
2. *Fetches.* An expert used at step b is either fetched for it or held on the device since its
   previous use (or since the window's start, when the device may hold anything for free: C
   cache slots and S staging buffers, loaded or in flight before). Between two uses it can only
   be held in a cache slot: a staging buffer is released (or handed to the cache) once its expert
   is computed. So the cache holds every expert "held" across a boundary between steps, and
   during step b every one held into b (it is computed from its slot, or pinned), never more than
   C; staging buffers add at most S uses served from the window's start. Relaxing every other
   rule of the engine (admission, pins of loads, the order of loads), the most uses of steps 0..j
   served without a fetch is then at most S plus the largest set of hold intervals (from just
   after a use to the end of the next use) with at most C at every point: a maximum C-colourable
   set of intervals, which the greedy by earliest right end finds for every prefix at once
   (Carlisle and Lloyd, 1995). So at least `F_j = uses(0..j) - held_j - S` fetches serve steps 0..j.
3. *Links.* Fetches take at least `d` each (latency + bytes / bandwidth; the smaller copy where
   the placement may load a low-precision one) on `channels` channels, so the F-th ends at least
   `ceil(F / channels) * d` after the window starts; what it brings is computed after it (a
   whole expert, or its last third with per-matrix pipelining). Where the placement may compute
   a missed expert on the CPU instead, F splits into f fetches and F - f CPU computations
   (`e_cpu` each, one after another): the least over f of the later of the two.

Hence the end of step j is at least `E_j = max(E_{j-1} + c_j, T(F_j))` with `T(F)` from 3,
and the window lasts at least `E_{n-1}`. The bound holds for the experts every run of the
gating policy computes: its plan when it is stateless, else the subset it runs whatever the
cache holds (`GatingPolicy.bound_plan`), for fewer uses need no more fetches and no more compute.

What it does not bound: TTFT (prefill), and anything the cost model itself gets wrong.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from sim.offline.steps import Steps, build_steps


@dataclass(frozen=True)
class BoundInputs:
    """What the bound depends on besides the steps (all in seconds, counts and bytes)."""

    slots: int  # cache capacity in experts
    staging_buffers: int
    channels: int
    fetch_s: float  # the shortest copy of one expert over the link
    expert_s: float  # one expert on one token, on the device, uncontended
    tail_s: float  # what must follow a fetch's end: expert_s, or a third of it when pipelined
    cpu_expert_s: float | None  # one expert on the CPU, where the placement may use it; else None


def held_per_step(steps: Steps, window: list[int], capacity: int) -> list[int]:
    """Uses of each step of `window` (global step indices, in order) served by holding the
    expert in one of `capacity` slots since its previous use in the window or the window's start,
    in the best relaxed schedule for every prefix: entry j counts those whose interval ends at
    step j.

    Points in time: 2j is during step j, 2j + 1 the boundary after it, -1 the window's start. A
    hold from the use at step a to the use at step b occupies a slot over points [2a + 1, 2b]."""
    local = {s: i for i, s in enumerate(window)}
    intervals: list[tuple[int, int]] = []  # (last point, first point)
    for key_steps in _uses_in(steps, window):
        first = -1  # held from the window's start
        for s in key_steps:
            b = local[s]
            intervals.append((2 * b, first))
            first = 2 * b + 1
    intervals.sort()
    # greedy by right end; each slot remembers the last point of its last interval (a sorted list);
    # an interval fits a slot whose last one ended before its first point; best fit: the latest such
    ends = [-2] * capacity
    held = [0] * len(window)
    for last, first in intervals:
        i = bisect.bisect_left(ends, first) - 1
        if i >= 0:
            del ends[i]
            ends.append(last)  # `last` >= every end so far: the list stays sorted
            held[last // 2] += 1
    return held


def _uses_in(steps: Steps, window: list[int]) -> list[list[int]]:
    lo, hi = window[0], window[-1]
    out = []
    for uses in steps.uses:
        i, j = bisect.bisect_left(uses, lo), bisect.bisect_right(uses, hi)
        if i < j:
            out.append(uses[i:j])
    return out


def windows(steps: Steps) -> list[list[int]]:
    """The decode steps of each sequence, in order (a sequence's decode tokens run back to back)."""
    out: dict[int, list[int]] = {}
    for s in range(steps.n):
        if not steps.is_prefill[s]:
            out.setdefault(steps.sequence[s], []).append(s)
    return list(out.values())


def _fetch_time_s(F: int, inp: BoundInputs) -> float:
    """The earliest time (from the window's start) by which F missed experts can all be computed
    (rule 3 of the module docstring)."""
    if F <= 0:
        return 0.0
    links = lambda f: math.ceil(f / inp.channels) * inp.fetch_s + inp.tail_s if f > 0 else 0.0  # noqa: E731
    if inp.cpu_expert_s is None:
        return links(F)
    cpu = lambda f: (F - f) * inp.cpu_expert_s  # noqa: E731
    lo, hi = 0, F  # the least f with links(f) >= cpu(f): the max of the two is smallest there or just before
    while lo < hi:
        mid = (lo + hi) // 2
        if links(mid) >= cpu(mid):
            hi = mid
        else:
            lo = mid + 1
    return min(max(links(f), cpu(f)) for f in (lo - 1, lo) if 0 <= f <= F)


def _step_compute_s(n: int, attention_s: float, inp: BoundInputs) -> float:
    if inp.cpu_expert_s is None or n == 0:
        return attention_s + n * inp.expert_s
    return attention_s + min(max(d * inp.expert_s, (n - d) * inp.cpu_expert_s) for d in range(n + 1))


def window_bounds_s(steps: Steps, attention_s: list[float], inp: BoundInputs) -> list[float]:
    """The least decode time of each sequence's window (module docstring)."""
    out = []
    for window in windows(steps):
        held = held_per_step(steps, window, inp.slots)
        uses = held_so_far = 0
        end = 0.0
        for j, s in enumerate(window):
            n = len(steps.keys[s])
            uses += n
            held_so_far += held[j]
            fetched = max(0, uses - held_so_far - inp.staging_buffers)
            end = max(end + _step_compute_s(n, attention_s[s], inp), _fetch_time_s(fetched, inp))
        out.append(end)
    return out


def tpot_lower_bound_s(ctx, ids: np.ndarray, inp: BoundInputs, attention_of_pos) -> float | None:
    """Mean TPOT no run of this configuration can beat; `ids` [T, L, k]: the experts every run
    computes (-1: not counted); `attention_of_pos(pos)`: one layer's non-expert work at a context."""
    steps = build_steps(ctx.trace, ids, prefill=ctx.prefill, max_tokens=ctx.max_tokens)
    pos = ctx.trace.pos.tolist()
    attention = [0.0 if steps.is_prefill[s] else attention_of_pos(pos[steps.token[s]]) for s in range(steps.n)]
    total = sum(window_bounds_s(steps, attention, inp))
    tokens = sum(not p for p in steps.is_prefill) // max(steps.layers, 1)
    return total / tokens if tokens else None
