"""A copy link (PCIe, NVMe, unified-memory DMA): a priority resource with `channels`.

States of a transfer (`sim/engine/transfer.py`): QUEUED (waiting for a channel) -> ACTIVE (on a
channel; `start_s` and `done_s` fixed) -> DONE (its `on_done(transfer, bytes moved)` callback has run). Two priorities: a queued DEMAND (0)
transfer starts before any queued PREFETCH (1) one; within a priority, in issue order. A transfer
in flight keeps its channel to the end, unless its owner cuts it short with `preempt` (a prefetch
issued in chunks). Duration = `latency_s + bytes / bandwidth_Bps`.

These are the semantics of a `simpy.PriorityResource` of capacity `channels` whose holders
release exactly when their transfer ends. The link schedules them itself (event elision): a
transfer creates no SimPy event; completions are applied lazily, in time order, whenever the
owner calls `advance(t)` before looking at or changing the link at time `t`. With one issuing
stream (batch-1 decode) this is exact, and it is what makes the engine several times faster than
a process per load; `tests/test_engine_vs_naive.py` checks it against `sim/engine/naive.py`, which uses
`simpy.PriorityResource` and one process per load, to 1e-9.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

from sim.engine.transfer import DEMAND, PREFETCH, Transfer


class CopyLink:
    """A link with `channels` concurrent transfers and a priority queue (see module docstring)."""

    def __init__(self, name: str, bandwidth_Bps: float, latency_s: float, channels: int,
                 on_done: Callable[[Transfer, float], None] | None = None, keep_history: bool = False):
        if bandwidth_Bps <= 0 or latency_s < 0 or channels < 1:
            raise ValueError(f"link {name}: need bandwidth > 0, latency >= 0, channels >= 1")
        self.name = name
        self.bandwidth_Bps = float(bandwidth_Bps)
        self.latency_s = float(latency_s)
        self.channels = int(channels)
        self.on_done = on_done
        self.now_s = 0.0  # the link's clock: everything up to here has been applied
        #: (done_s, seqno, transfer) of the transfers on a channel, a heap. Read-only outside this class;
        #: an owner on a hot path may peek `running_heap[0][0]` to skip an `advance` with nothing to apply.
        self.running_heap: list[tuple[float, int, Transfer]] = []
        #: waiting transfers, one FIFO per priority (DEMAND, PREFETCH): issue order within a priority
        self._queues: tuple[deque[Transfer], deque[Transfer]] = (deque(), deque())
        self._seq = 0
        #: told of every change of the schedule (`_tell_profile`, a preempt): a
        #: `sim.machine.contention.MemoryBus` whose bandwidth profile follows the copy bodies
        self.profile = None
        #: transfers that ended after the owner's clock (applied by a lookahead), in completion
        #: order; None: not kept, and `copy_bodies` then only sees what is still on a channel
        self.history: deque[Transfer] | None = deque() if keep_history else None
        self.busy_s = 0.0  # sum of transfer durations (utilisation)
        self.bytes_moved = 0.0
        self.max_active = 0

    def duration_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps

    def advance(self, t_s: float, lookahead: bool = False) -> None:
        """Apply every completion at or before `t_s` (starting queued transfers as channels free).

        `t_s` is the owner's clock: it will not ask about earlier times again. `lookahead=True`
        (`wait_started`) applies completions ahead of the owner's clock; with `keep_history` they
        are remembered so that `copy_bodies` still sees them in flight at earlier times."""
        running, on_done, history = self.running_heap, self.on_done, self.history
        if history and not lookahead:
            while history and history[0].done_s <= t_s:  # ended before the owner's clock: forget
                history.popleft()
        demand_q, prefetch_q = self._queues
        while running and running[0][0] <= t_s:
            done_s, _, tr = heapq.heappop(running)
            self.now_s = done_s
            tr.done = True
            if lookahead and history is not None:
                history.append(tr)
            if on_done is not None:  # with the bytes it moved: all of them, or up to its cut
                on_done(tr, tr.nbytes if not tr.cancelled
                        else max(0.0, (done_s - tr.start_s - self.latency_s) * self.bandwidth_Bps))
            if demand_q or prefetch_q:  # the freed channel takes the next queued transfer
                self._start((demand_q or prefetch_q).popleft(), done_s)
        if t_s > self.now_s:
            self.now_s = t_s

    def submit(self, key: int, nbytes: float, priority: int, t_s: float, staging: bool = False, token: int = -1,
               layer: int = -1) -> Transfer:
        """Issue a transfer at time `t_s` (>= the link's clock); it starts at once if a channel is free."""
        running = self.running_heap
        if running and running[0][0] <= t_s:
            self.advance(t_s)
        assert t_s >= self.now_s - 1e-15 and (priority == DEMAND or priority == PREFETCH), (
            f"link {self.name}: transfer of priority {priority} issued at {t_s}, link clock {self.now_s}")
        if t_s > self.now_s:
            self.now_s = t_s
        self._seq += 1
        tr = Transfer(key, nbytes, priority, staging, token, layer, t_s, self._seq)
        if self.profile is not None:  # copies share memory bandwidth
            self._tell_profile(tr, t_s)
        if len(running) < self.channels:
            self._start(tr, t_s)
        else:
            self._queues[priority].append(tr)
        return tr

    def _tell_profile(self, tr: Transfer, t_s: float) -> None:
        """Tell the profile of the body this submit adds, when it only adds one after every other
        (one channel, the transfer goes to the end of the line: the profile extends itself);
        else that the schedule changed (the profile rebuilds itself from `copy_bodies`)."""
        running, (demand_q, prefetch_q) = self.running_heap, self._queues
        if self.channels != 1 or (tr.priority == DEMAND and prefetch_q):  # every later body may move
            self.profile.changed()
            return
        lat = self.latency_s
        if not running:
            start = t_s
        else:  # behind everything queued
            start = running[0][0]
            for q in (demand_q, prefetch_q):
                for x in q:
                    start += lat + x.nbytes / self.bandwidth_Bps
        self.profile.added(start + lat, start + (lat + tr.nbytes / self.bandwidth_Bps))

    def _start(self, tr: Transfer, t_s: float) -> None:
        dur = self.latency_s + tr.nbytes / self.bandwidth_Bps
        tr.start_s = t_s
        tr.done_s = t_s + dur
        heapq.heappush(self.running_heap, (tr.done_s, tr.seqno, tr))
        n = len(self.running_heap)
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
        if self.profile is not None:
            self.profile.changed()
        self.running_heap[:] = [(d if x is not tr else new_done, q, x) for d, q, x in self.running_heap]  # in place: owners hold it
        heapq.heapify(self.running_heap)
        return new_done

    def busy_channels(self) -> int:
        return len(self.running_heap)

    def running(self) -> list[Transfer]:
        return [x for _, _, x in self.running_heap]

    def wait_started(self, tr: Transfer) -> None:
        """Advance the link until `tr` is on a channel (its `done_s` is then known).

        Only valid while nothing else is issued meanwhile (the owner is waiting for `tr`)."""
        while tr.start_s < 0.0:  # not yet on a channel
            assert self.running_heap, f"link {self.name}: transfer {tr.key} queued on an idle link"
            self.advance(self.running_heap[0][0], lookahead=True)

    def copy_bodies(self, t_s: float) -> list[tuple[float, float]]:
        """(start, end) of the body (the transfer after its latency) of every copy submitted so far
        whose body may still be in flight at or after `t_s`: ended ones the owner looked past
        (`history`), those on a channel, and the queued ones at the times they will start if
        nothing else is submitted (channels free in done order; demand before prefetch). This is
        what a link that shares memory bandwidth takes from compute ops that start at `t_s`
        (`sim/machine/contention.py`); the owner issues nothing before such an op ends. `t_s` is the
        owner's clock (never decreasing): history that ended before it is forgotten."""
        lat = self.latency_s
        history = self.history
        if history:
            while history and history[0].done_s <= t_s:  # `t_s` is the owner's clock: ended before it
                history.popleft()
        out = [(tr.start_s + lat, tr.done_s) for tr in history] if history else []
        running = self.running_heap
        out += [(tr.start_s + lat, done) for done, _, tr in running]
        demand_q, prefetch_q = self._queues
        if demand_q or prefetch_q:  # every channel is busy: each queued copy takes the next one to free
            free = [done for done, _, _ in running]
            heapq.heapify(free)
            for tr in (*demand_q, *prefetch_q):
                begin = heapq.heappop(free)
                done = begin + (lat + tr.nbytes / self.bandwidth_Bps)  # as `_start` computes it
                out.append((begin + lat, done))
                heapq.heappush(free, done)
        return out

    @property
    def queued(self) -> int:
        return len(self._queues[0]) + len(self._queues[1])
