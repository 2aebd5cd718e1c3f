"""Copies and compute sharing the device's memory bandwidth (unified memory), piecewise in time.

On a machine whose copies land in the memory the compute reads (Jetson, Apple, a CPU-only host),
a copy in flight takes the link's bandwidth from the compute stream *while it is in flight*. A
compute op (attention, an expert) is modelled as its fixed launch overhead followed by a body
that must read `nbytes` from memory and takes at least `flops / matmul_flops`:

    overhead = kernels * kernel_overhead_s          (no memory traffic)
    bw(t)    = max(B - n(t) * b, FLOOR * B)          n(t): copies whose body is in flight at t
    body     = max(the time T with  integral_{t0}^{t0+T} bw(t) dt = nbytes,  flops / matmul_flops)

where `B` is the device's memory bandwidth, `b` the link's, and a copy's body is its transfer
after the link latency (`[start_s + latency_s, done_s]`; the latency is request set-up, not
traffic). `FLOOR` (10%) keeps compute progressing when copies would take everything.

Why piecewise: a copy that overlaps an op for a microsecond slows it by a microsecond's worth of
bandwidth, not for the op's whole duration. With `n(t) * b <= (1 - FLOOR) * B` copies and compute
together never use more than `B`, so a faster link moves the same bytes in less time and takes
the same bandwidth-time from compute; beyond that the floor keeps compute at 10% (the copies are
not slowed: `B` is the bandwidth compute attains, which on a CPU is well below what the memory
bus can carry, so a copy can be as fast as a GEMV's reads). A copy costs compute nothing while it
overlaps an op's launch overhead or a wait (the memory is idle then), so a faster link, memory or
more channels, which move copies relative to ops, can make a demand-only token later, by at most
its copies' bytes at the memory bandwidth (a faster copy that no longer overlaps a gap takes all
of its bandwidth-time from an op's body); where copies do not share memory bandwidth they never
slow one (`tests/test_physics.py`, `contention_slack_s`).

`MemoryBus` answers "how long does reading `nbytes` from `t0` take" from the link's copy bodies
(`sim.engine.link.CopyLink.copy_bodies`): it keeps the cumulative bandwidth left to compute, W(t), as a
piecewise-linear function rebuilt when the link's schedule changes (a submit or a preempt), so
that an op costs two bisections; a submit that only adds a copy after every other one (one
channel) extends the profile instead (`MemoryBus.added`). `sim/engine/naive.py` simulates the same model the direct way (a
compute process re-rated at every copy start and end), and the two agree to 1e-9.
"""

from __future__ import annotations

import bisect

FLOOR = 0.1  # compute keeps at least this share of the memory bandwidth


class MemoryBus:
    """The device memory bandwidth that a link's copies leave to compute, over time.

    States: *valid* or *stale*. The link tells it of each change of its schedule: a submit that
    only adds a copy body after every other one extends a valid profile (`added`); any other
    submit, or a preempt, makes it stale (`changed`), and the next query rebuilds it from the
    copies that end after that query's start. Queries come from one owner (the compute stream) in
    time order, and it issues nothing before the op it asks about has ended, so the copies
    already submitted are all there is."""

    def __init__(self, memory_Bps: float, copy_Bps: float, link):
        if memory_Bps <= 0 or copy_Bps <= 0:
            raise ValueError("memory and copy bandwidths must be > 0")
        self.memory_Bps = float(memory_Bps)
        self.copy_Bps = float(copy_Bps)
        self.floor_Bps = FLOOR * self.memory_Bps
        self._rate_one = self._rate(1)
        self.link = link
        link.profile = self
        self.stale = True
        self._t0_s = 0.0  # the last query's start of reading: queries never go back before it
        #: change points of n(t), the rate left to compute after each, and W at each point
        self._times: list[float] = []
        self._rates: list[float] = []
        self._work: list[float] = []

    def _rate(self, copies: int) -> float:
        return max(self.memory_Bps - copies * self.copy_Bps, self.floor_Bps)

    def _rebuild(self, t0_s: float) -> None:
        changes = []
        for b0, b1 in self.link.copy_bodies(t0_s):
            if b1 > b0:
                changes.append((b0, 1))
                changes.append((b1, -1))
        changes.sort()
        times, rates, work = [], [], []
        n, w = 0, 0.0
        for at, delta in changes:
            if times:
                w += rates[-1] * (at - times[-1])
            n += delta
            times.append(at)
            rates.append(self._rate(n))
            work.append(w)
        self._times, self._rates, self._work = times, rates, work
        self.stale = False

    def changed(self) -> None:
        """The link's schedule changed in a way `added` cannot describe: rebuild at the next query."""
        self.stale = True

    def added(self, b0: float, b1: float) -> None:
        """The link added a copy body `[b0, b1]` that starts after every other: two change points."""
        if self.stale:
            return
        times, rates, work = self._times, self._rates, self._work
        if times and b0 < times[-1]:
            self.stale = True
            return
        if len(times) > 64:  # queries only move forward: forget the change points before the last one's segment
            i = bisect.bisect_right(times, self._t0_s) - 1
            if i > 0:
                del times[:i], rates[:i], work[:i]
                base = work[0]  # W counts from the first point kept: it stays small, and precise
                work[:] = [w - base for w in work]
        if b1 > b0:
            w = work[-1] + rates[-1] * (b0 - times[-1]) if times else 0.0
            one = self._rate_one
            times += (b0, b1)
            rates += (one, self.memory_Bps)  # the rate left beside one copy, then beside none
            work += (w, w + one * (b1 - b0))

    def op_s(self, work, start_s: float) -> float:
        """The duration of `work` (a `sim.machine.cost.OpWork`) started at `start_s` beside the copies:
        its overhead, then the larger of its matmul time and the time its `nbytes` take to read
        from the end of the overhead at the bandwidth the copies leave."""
        overhead_s, nbytes = work.overhead_s, work.nbytes
        t0_s = start_s + overhead_s
        self._t0_s = t0_s
        if self.stale:
            self._rebuild(t0_s)
        times = self._times
        if not times or t0_s >= times[-1]:  # no copy in flight from t0 on
            return overhead_s + max(nbytes / self.memory_Bps, work.matmul_s)
        rates, cum = self._rates, self._work
        i = bisect.bisect_right(times, t0_s) - 1  # the segment holding t0 (-1: before the first copy)
        if i < 0:
            w0 = (t0_s - times[0]) * self.memory_Bps  # W before the first change point (negative)
            if w0 + nbytes <= 0.0:
                return overhead_s + max(nbytes / self.memory_Bps, work.matmul_s)
        else:
            w0 = cum[i] + (t0_s - times[i]) * rates[i]
        target = w0 + nbytes
        j = bisect.bisect_right(cum, target) - 1  # the segment where W reaches the target
        if j < 0:
            end = times[0] + target / self.memory_Bps
        else:
            end = times[j] + (target - cum[j]) / rates[j]
        return overhead_s + max(max(end - t0_s, 0.0), work.matmul_s)
