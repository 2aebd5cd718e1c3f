"""The one preemption rule every machine applies (simulated and real): which prefetch a demand load cuts.

A demand load that finds every channel busy may cut a prefetch short, if the prefetch policy issues
its loads in chunks (`yield_chunk_bytes`): the copy stops at its next chunk boundary, its data is
unusable, and its channel is free for the demand load from then on. The rule:

- candidates: the prefetches on a channel that are not already cut (or asked to stop) and that the
  current layer does not need (`pinned`: cutting a load the layer waits for would only delay it);
- the chosen one frees its channel soonest (its cut time; ties by issue order);
- it is cut only if that is before any transfer on a channel ends anyway (then waiting is as good).

A transfer's cut time is its next chunk boundary after `now_s` counted from the first byte of its
body (`start_s + latency_s`), or the body's start if it has not begun, never after its end. A
simulated link knows every end (`done_s`); the real run estimates them from the profile's link.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sim.engine.transfer import PREFETCH, Transfer


def _done_s(tr: Transfer) -> float:
    return tr.done_s


def cut_time(tr: Transfer, now_s: float, chunk_s: float, latency_s: float, done_s: float) -> float:
    """When `tr` (on a channel, ending at `done_s`) stops if it is cut at `now_s`."""
    body0 = tr.start_s + latency_s
    if now_s <= body0:
        return min(done_s, body0)
    return min(done_s, body0 + -(-(now_s - body0) // chunk_s) * chunk_s)


def choose_cut(busy: Sequence[Transfer], channels: int, pinned: set[int], now_s: float, chunk_s: float,
               latency_s: float, done_of: Callable[[Transfer], float] = _done_s) -> tuple[Transfer, float] | None:
    """(the prefetch to cut, when it stops) for a demand load issued at `now_s`, or None.

    `busy` are the transfers on a channel, `chunk_s` the time one chunk takes on the link, `done_of`
    the end of a transfer on a channel (a simulated one's `done_s`; an estimate on a real link)."""
    if len(busy) < channels:
        return None
    cands = [x for x in busy if x.priority == PREFETCH and not (x.cancelled or x.cancel_requested)
             and x.key not in pinned]
    if not cands:
        return None
    best, cut = None, 0.0
    for x in cands:
        c = cut_time(x, now_s, chunk_s, latency_s, done_of(x))
        if best is None or (c, x.seqno) < (cut, best.seqno):
            best, cut = x, c
    if cut < min(done_of(x) for x in busy):
        return best, cut
    return None
