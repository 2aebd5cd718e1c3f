"""A copy link (PCIe, NVMe, unified-memory DMA) as a SimPy priority resource with `channels`.

States of a transfer: QUEUED (waiting for a channel) -> ACTIVE (on a channel, `start_s` and
`done_s` fixed) -> DONE (its `event` has fired). A queued transfer with a lower `priority` value
starts first (demand loads = 0 go ahead of prefetches = 1); ties start in issue order. A transfer
in flight is never preempted. Duration = `latency_s + bytes / bandwidth_Bps`.

Unlike `simpy.PriorityResource`, a transfer costs one SimPy event (its completion timeout), not
a request/grant/release triple: a link is used by the thousand per simulated second, and this is
the engine's hottest resource. The semantics are those of a PriorityResource of capacity
`channels` whose holders release exactly when their transfer ends.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import simpy

DEMAND = 0
PREFETCH = 1


@dataclass(eq=False)
class Transfer:
    """One copy over a link. Once started, `event` (a timeout) fires at `done_s`, after `on_done(transfer)`."""

    key: int
    nbytes: float
    priority: int
    issued_s: float
    event: simpy.Event | None  # None while queued
    on_done: Callable[[Transfer], None] | None = None
    start_s: float = -1.0  # -1 while queued
    done_s: float = -1.0
    tag: Any = None  # the engine's bookkeeping (e.g. the cache entry / staging flag)
    seqno: int = field(default=0)

    @property
    def started(self) -> bool:
        return self.start_s >= 0.0


class Link:
    """A link with `channels` concurrent transfers and a priority queue (see module docstring)."""

    def __init__(self, env: simpy.Environment, name: str, bandwidth_Bps: float, latency_s: float, channels: int):
        if bandwidth_Bps <= 0 or latency_s < 0 or channels < 1:
            raise ValueError(f"link {name}: need bandwidth > 0, latency >= 0, channels >= 1")
        self.env = env
        self.name = name
        self.bandwidth_Bps = float(bandwidth_Bps)
        self.latency_s = float(latency_s)
        self.channels = int(channels)
        self.active: list[Transfer] = []
        self._queue: list[tuple[int, int, Transfer]] = []  # (priority, seqno, transfer)
        self._seq = 0
        self.busy_s = 0.0  # sum of transfer durations (for utilisation)
        self.bytes_moved = 0.0
        self.max_active = 0

    def duration_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps

    def submit(self, key: int, nbytes: float, priority: int, on_done: Callable[[Transfer], None] | None = None,
               tag: Any = None, now: float | None = None) -> Transfer:
        """Queue a transfer at time `now` (default env.now); it starts at once if a channel is free.

        `now` may be ahead of env.now only when no SimPy event is due before it (the caller checks
        `env.peek() > now`): then nothing can change the link in between and the result is the
        same as advancing the clock first, without the cost of a timeout event.
        """
        self._seq += 1
        now = self.env.now if now is None else now
        tr = Transfer(key, nbytes, priority, now, None, on_done, tag=tag, seqno=self._seq)
        if len(self.active) < self.channels:
            self._start(tr, now)
        else:
            heapq.heappush(self._queue, (priority, tr.seqno, tr))
        return tr

    def _start(self, tr: Transfer, now: float | None = None) -> None:
        env_now = self.env.now
        now = env_now if now is None else now
        tr.start_s = now
        dur = self.duration_s(tr.nbytes)
        tr.done_s = now + dur
        self.active.append(tr)
        self.max_active = max(self.max_active, len(self.active))
        assert len(self.active) <= self.channels, f"link {self.name}: {len(self.active)} > {self.channels} channels"
        self.busy_s += dur
        self.bytes_moved += tr.nbytes
        tr.event = self.env.timeout(now + dur - env_now, tr)
        tr.event.callbacks.append(lambda _ev, tr=tr: self._finish(tr))  # runs before any waiter resumes

    def _finish(self, tr: Transfer) -> None:
        self.active.remove(tr)
        if tr.on_done is not None:
            tr.on_done(tr)
        if self._queue:
            self._start(heapq.heappop(self._queue)[2])

    @property
    def queued(self) -> int:
        return len(self._queue)

    def active_at(self, t_s: float) -> int:
        """Transfers in flight at time `t_s` (started at or before it, not yet done)."""
        return sum(1 for tr in self.active if tr.start_s <= t_s < tr.done_s)
