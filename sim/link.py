"""A copy link (PCIe, NVMe, unified-memory DMA): a priority resource with `channels`.

States of a transfer: QUEUED (waiting for a channel) -> ACTIVE (on a channel; `start_s` and
`done_s` fixed) -> DONE (its `on_done` callback has run). A queued transfer with a lower
`priority` value starts first (demand loads = 0 go ahead of prefetches = 1); ties start in issue
order. A transfer in flight is never preempted. Duration = `latency_s + bytes / bandwidth_Bps`.

These are the semantics of a `simpy.PriorityResource` of capacity `channels` whose holders
release exactly when their transfer ends. The link schedules them itself (event elision): a
transfer creates no SimPy event; completions are applied lazily, in time order, whenever the
owner calls `advance(t)` before looking at or changing the link at time `t`. With one issuing
stream (batch-1 decode) this is exact, and it is what makes the engine several times faster than
a process per load; `tests/test_engine_vs_naive.py` checks it against `sim/naive.py`, which uses
`simpy.PriorityResource` and one process per load, to 1e-9.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEMAND = 0
PREFETCH = 1


@dataclass(eq=False, slots=True)
class Transfer:
    """One copy over a link. `start_s`/`done_s` are -1 while queued."""

    key: int
    nbytes: float
    priority: int
    issued_s: float
    seqno: int
    tag: Any = None  # the owner's bookkeeping
    start_s: float = -1.0
    done_s: float = -1.0
    done: bool = False
    cancelled: bool = False  # cut short by `preempt`: its data is incomplete and unusable

    @property
    def started(self) -> bool:
        return self.start_s >= 0.0


class Link:
    """A link with `channels` concurrent transfers and a priority queue (see module docstring)."""

    def __init__(self, name: str, bandwidth_Bps: float, latency_s: float, channels: int,
                 on_done: Callable[[Transfer], None] | None = None):
        if bandwidth_Bps <= 0 or latency_s < 0 or channels < 1:
            raise ValueError(f"link {name}: need bandwidth > 0, latency >= 0, channels >= 1")
        self.name = name
        self.bandwidth_Bps = float(bandwidth_Bps)
        self.latency_s = float(latency_s)
        self.channels = int(channels)
        self.on_done = on_done
        self.now_s = 0.0  # the link's clock: everything up to here has been applied
        self._running: list[tuple[float, int, Transfer]] = []  # (done_s, seqno, transfer) on channels
        self._queue: list[tuple[int, int, Transfer]] = []  # (priority, seqno, transfer) waiting
        self._seq = 0
        self.busy_s = 0.0  # sum of transfer durations (utilisation)
        self.bytes_moved = 0.0
        self.max_active = 0

    def duration_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps

    def advance(self, t_s: float) -> None:
        """Apply every completion at or before `t_s` (starting queued transfers as channels free)."""
        running = self._running
        while running and running[0][0] <= t_s:
            done_s, _, tr = heapq.heappop(running)
            self.now_s = done_s
            tr.done = True
            if self.on_done is not None:
                self.on_done(tr)
            if self._queue:
                self._start(heapq.heappop(self._queue)[2], done_s)
        if t_s > self.now_s:
            self.now_s = t_s

    def submit(self, key: int, nbytes: float, priority: int, t_s: float, tag: Any = None) -> Transfer:
        """Issue a transfer at time `t_s` (>= the link's clock); it starts at once if a channel is free."""
        self.advance(t_s)
        assert t_s >= self.now_s - 1e-15, f"link {self.name}: transfer issued at {t_s} before the link's clock {self.now_s}"
        self._seq += 1
        tr = Transfer(key, nbytes, priority, t_s, self._seq, tag)
        if len(self._running) < self.channels:
            self._start(tr, t_s)
        else:
            heapq.heappush(self._queue, (priority, tr.seqno, tr))
        return tr

    def _start(self, tr: Transfer, t_s: float) -> None:
        dur = self.latency_s + tr.nbytes / self.bandwidth_Bps
        tr.start_s = t_s
        tr.done_s = t_s + dur
        heapq.heappush(self._running, (tr.done_s, tr.seqno, tr))
        n = len(self._running)
        assert n <= self.channels, f"link {self.name}: {n} transfers on {self.channels} channels"
        if n > self.max_active:
            self.max_active = n
        self.busy_s += dur
        self.bytes_moved += tr.nbytes

    def preempt(self, tr: Transfer, t_s: float, chunk_bytes: float) -> float:
        """Cut an active transfer at the first chunk boundary at or after `t_s`; returns that time.

        Models a transfer issued in chunks of `chunk_bytes` that yields its channel between chunks
        (a copy in flight cannot be stopped mid-chunk). The transfer is marked `cancelled`; the
        bytes and busy time it no longer moves are taken off the link's counters."""
        assert tr.started and not tr.done and t_s >= tr.start_s, f"link {self.name}: cannot preempt {tr.key}"
        chunk_s = chunk_bytes / self.bandwidth_Bps
        body0 = tr.start_s + self.latency_s
        n = max(0, -(-(t_s - body0) // chunk_s)) if t_s > body0 else 0  # chunks begun by t_s
        new_done = min(tr.done_s, body0 + n * chunk_s if n else max(t_s, body0))
        self.busy_s -= tr.done_s - new_done
        self.bytes_moved -= (tr.done_s - new_done) * self.bandwidth_Bps
        tr.done_s = new_done
        tr.cancelled = True
        self._running = [(d if x is not tr else new_done, q, x) for d, q, x in self._running]
        heapq.heapify(self._running)
        return new_done

    def busy_channels(self) -> int:
        return len(self._running)

    def running(self) -> list[Transfer]:
        return [x for _, _, x in self._running]

    def wait_started(self, tr: Transfer) -> None:
        """Advance the link until `tr` is on a channel (its `done_s` is then known).

        Only valid while nothing else is issued meanwhile (the owner is waiting for `tr`)."""
        while not tr.started:
            assert self._running, f"link {self.name}: transfer {tr.key} queued on an idle link"
            self.advance(self._running[0][0])

    @property
    def queued(self) -> int:
        return len(self._queue)

    def in_flight_at(self, t_s: float) -> int:
        """`advance(t_s)`, then the transfers on a channel at `t_s` (the engine's hot path)."""
        running = self._running
        if running and running[0][0] <= t_s:
            self.advance(t_s)
        elif t_s > self.now_s:
            self.now_s = t_s
        if t_s >= self.now_s:
            return len(running)
        n = 0
        for _, _, tr in running:
            n += tr.start_s <= t_s
        return n

    def active_at(self, t_s: float) -> int:
        """Transfers on a channel at `t_s` (call `advance(t_s)` first for an exact count)."""
        if t_s >= self.now_s:  # every running transfer started at or before the link's clock
            return len(self._running)
        return sum(1 for _, _, tr in self._running if tr.start_s <= t_s)
