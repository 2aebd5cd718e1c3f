"""Storage -> host -> device: the two hops of a tiered run, scheduled without events (docs/tiers.md).

A tiered run keeps experts on `storage`, a host-DRAM expert cache (`sim.engine.host.HostCache`)
and the device cache. A device load of an expert (`submit`) is a *copy* over `host_to_device`; when
the expert is not in host memory it follows a *read* over `storage_to_host` (one read per expert
at a time: a load that finds a read in flight follows that one). Whole (`tiers.pipelined=false`):
the copy is queued when its read ends. Pipelined (`tiers.pipelined=true`, `tiers.chunks` per
expert): the copy is queued once the read's first chunk is in, and ends no earlier than one chunk's
copy after the read ends (`Transfer.min_done_s`): the copy holds its channel while it waits for the
read's chunks, as a chunked copy stream does. Each hop has its own channels and two priorities
(a queued demand transfer starts before a queued prefetch; within one, in issue order), as
`sim.engine.link.CopyLink`. A read inherits the priority of the load that issued it (a prefetch's
read is not promoted when a demand load later follows it).

`TierLink` is the fast machine's link for such a run: it has `CopyLink`'s surface (the device
copies are what the step sees: `running_heap`, `advance`, `submit`, `wait_started`, `preempt`,
`running`, the counters), and one event heap for both hops: a copy's end, a read's end, a copy's
release (pipelined). `running_heap[0][0]` is the next event of either hop, so the fast machine's
peek-then-advance applies them in time order. The SimPy machine (`sim.engine.events`) runs the same
rules with a process per transfer; `tests/test_tiers.py` checks the two agree.

A demand load that cuts a prefetch (`prefetch.yield_to_demand`) cuts a device copy only; reads are
never cut. Links that share the device's memory bandwidth are not modelled with tiers (the
runner refuses them: unified memory has no host tier).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

from sim.engine.host import READING, RESIDENT, HostCache
from sim.engine.recorder import LoadLog
from sim.engine.transfer import DEMAND, PREFETCH, Transfer

COPY_DONE, READ_DONE, RELEASE = 0, 1, 2  # kinds of events in the heap


class Hop:
    """One hop's channels and queues: its spec, its state, its counters."""

    __slots__ = ("name", "bandwidth_Bps", "latency_s", "channels", "busy", "queues", "busy_s", "bytes_moved",
                 "max_active", "stall_s")

    def __init__(self, name: str, bandwidth_Bps: float, latency_s: float, channels: int):
        if bandwidth_Bps <= 0 or latency_s < 0 or channels < 1:
            raise ValueError(f"hop {name}: need bandwidth > 0, latency >= 0, channels >= 1")
        self.name, self.bandwidth_Bps, self.latency_s, self.channels = name, float(bandwidth_Bps), float(latency_s), int(channels)
        self.busy = 0
        self.queues: tuple[deque[Transfer], deque[Transfer]] = (deque(), deque())  # DEMAND, PREFETCH
        self.busy_s = self.bytes_moved = self.stall_s = 0.0
        self.max_active = 0


class TierLink:
    """The two hops for the fast machine (module docstring)."""

    def __init__(self, read: Hop, copy: Hop, host: HostCache, pipelined: bool, chunk_bytes: float, reads: LoadLog,
                 read_bytes: float, on_done: Callable[[Transfer, float], None] | None = None):
        self.read, self.copy, self.host = read, copy, host
        self.read_bytes = float(read_bytes)  # an expert's full size on storage (a low-precision copy's read too)
        self.pipelined = pipelined
        self.chunk_bytes = float(chunk_bytes)
        self.reads = reads  # the reads' log (the copies are the ledger's loads)
        self.on_done = on_done
        # CopyLink's surface: the device hop
        self.name, self.bandwidth_Bps, self.latency_s = copy.name, copy.bandwidth_Bps, copy.latency_s
        self.channels = copy.channels
        self.profile = self.history = None  # (no memory-bandwidth sharing with tiers)
        #: every pending event of both hops, (time_s, order, kind, transfer): the next is [0][0]
        self.running_heap: list[tuple[float, int, int, Transfer]] = []
        self.now_s = 0.0
        self._seq = 0  # device copies, from 1 (the load log's rows)
        self._rseq = 0  # reads, from 1 (the reads log's rows)
        self._order = 0
        self._followers: dict[int, list[Transfer]] = {}  # read seqno -> the copies that follow it
        self.host_prefetches = 0
        self.host_prefetch_skipped = 0
        self.stall_other_s = 0.0  # the storage part of prefill's and batched steps' stalls (`storage_stall`)

    # counters the summary reads, as CopyLink's
    @property
    def busy_s(self) -> float:
        return self.copy.busy_s

    @property
    def bytes_moved(self) -> float:
        return self.copy.bytes_moved

    @property
    def max_active(self) -> int:
        return self.copy.max_active

    def duration_s(self, nbytes: float) -> float:
        return self.copy.latency_s + nbytes / self.copy.bandwidth_Bps

    # ------------------------------------------------------------------ events
    def _push(self, time_s: float, kind: int, tr: Transfer) -> None:
        self._order += 1
        heapq.heappush(self.running_heap, (time_s, self._order, kind, tr))

    def _start(self, hop: Hop, tr: Transfer, t_s: float) -> None:
        tr.start_s = t_s
        dur = hop.latency_s + tr.nbytes / hop.bandwidth_Bps
        done = t_s + dur  # (as `CopyLink._start` computes it)
        if done < tr.min_done_s:
            done = tr.min_done_s
            dur = done - t_s
        tr.done_s = done
        hop.busy += 1
        assert hop.busy <= hop.channels, f"hop {hop.name}: {hop.busy} transfers on {hop.channels} channels"
        if hop.busy > hop.max_active:
            hop.max_active = hop.busy
        hop.busy_s += dur
        hop.bytes_moved += tr.nbytes
        if hop is self.copy:
            self._push(done, COPY_DONE, tr)
        else:
            self._push(done, READ_DONE, tr)
            if self.pipelined:
                for c in self._followers.pop(tr.seqno, ()):
                    self._release_pipelined(c, tr, t_s)

    def _enqueue(self, hop: Hop, tr: Transfer, t_s: float) -> None:
        if hop.busy < hop.channels:
            self._start(hop, tr, t_s)
        else:
            hop.queues[tr.priority].append(tr)

    def _release_pipelined(self, copy: Transfer, read: Transfer, t_s: float) -> None:
        """`read` is on its channel: `copy` may start once the read's first chunk is in, and ends no
        earlier than a chunk's copy after the read's end."""
        first = read.start_s + self.read.latency_s + self.chunk_bytes / self.read.bandwidth_Bps
        copy.min_done_s = read.done_s + self.chunk_bytes / self.copy.bandwidth_Bps
        if first <= t_s:
            self._enqueue(self.copy, copy, t_s)
        else:
            self._push(first, RELEASE, copy)

    def advance(self, t_s: float, lookahead: bool = False) -> None:
        """Apply every event at or before `t_s`, in time order (`CopyLink.advance`)."""
        heap, copy, read, host = self.running_heap, self.copy, self.read, self.host
        while heap and heap[0][0] <= t_s:
            time_s, _, kind, tr = heapq.heappop(heap)
            if time_s > self.now_s:
                self.now_s = time_s
            if kind == COPY_DONE:
                copy.busy -= 1
                tr.done = True
                host.unpin(tr.key)
                q = copy.queues
                if q[0] or q[1]:  # the freed channel takes the next queued copy
                    self._start(copy, (q[0] or q[1]).popleft(), time_s)
                if self.on_done is not None:
                    self.on_done(tr, tr.nbytes if not tr.cancelled
                                 else max(0.0, (time_s - tr.start_s - copy.latency_s) * copy.bandwidth_Bps))
            elif kind == READ_DONE:
                read.busy -= 1
                tr.done = True
                host.read_done(tr)
                self.reads.finish(tr, tr.nbytes)
                q = read.queues
                if q[0] or q[1]:
                    self._start(read, (q[0] or q[1]).popleft(), time_s)
                if not self.pipelined:
                    for c in self._followers.pop(tr.seqno, ()):
                        self._enqueue(copy, c, time_s)
            else:  # RELEASE: a pipelined copy's read has its first chunk in
                self._enqueue(copy, tr, time_s)
        if t_s > self.now_s:
            self.now_s = t_s

    # ------------------------------------------------------------------ the issuer's operations
    def submit(self, key: int, nbytes: float, priority: int, t_s: float, staging: bool = False, token: int = -1,
               layer: int = -1) -> Transfer:
        """A device load of `key` at `t_s`: a copy, after a read when the expert is not in host memory."""
        heap = self.running_heap
        if heap and heap[0][0] <= t_s:
            self.advance(t_s)
        assert t_s >= self.now_s - 1e-12 * max(1.0, t_s) and priority in (DEMAND, PREFETCH), (
            f"tiers: transfer of priority {priority} issued at {t_s}, clock {self.now_s}")
        if t_s > self.now_s:
            self.now_s = t_s
        self._seq += 1
        tr = Transfer(key, nbytes, priority, staging, token, layer, t_s, self._seq)
        host = self.host
        where = host.lookup(key, token)
        host.pin(key)
        if where == RESIDENT:
            self._enqueue(self.copy, tr, t_s)
            return tr
        r = host.reading[key] if where == READING else self._issue_read(key, priority, t_s, token, layer, False)
        tr.source = r
        if self.pipelined and r.start_s >= 0.0:
            self._release_pipelined(tr, r, t_s)
        else:
            self._followers.setdefault(r.seqno, []).append(tr)
        return tr

    def new_read(self, key: int, priority: int, token: int, layer: int, t_s: float, prefetch: bool) -> Transfer | None:
        """A storage read of `key` issued at `t_s`, admitted by the host cache (a slot, its victim
        evicted, or a bounce buffer: `staging`) and booked (the reads log, `HostCache.reading`); None:
        a prefetch into host found no slot. Every machine issues its reads here, then runs them."""
        cached = self.host.admit(key, token, prefetch)
        if cached is None:
            return None
        self._rseq += 1
        r = Transfer(key, self.read_bytes, priority, not cached, token, layer, t_s, self._rseq)
        self.host.reading_started(r)
        self.reads.add(r)
        return r

    def _issue_read(self, key: int, priority: int, t_s: float, token: int, layer: int, prefetch: bool) -> Transfer | None:
        r = self.new_read(key, priority, token, layer, t_s, prefetch)
        if r is not None:
            self._enqueue(self.read, r, t_s)
        return r

    def read_to_host(self, key: int, priority: int, t_s: float, token: int, layer: int) -> Transfer | None:
        """A prefetch into host memory (`prefetch.into=host`) or a CPU job's read: the read of `key`
        (the one in flight, if any; None when it is resident, or a prefetch found no slot)."""
        heap = self.running_heap
        if heap and heap[0][0] <= t_s:
            self.advance(t_s)
        if t_s > self.now_s:
            self.now_s = t_s
        host = self.host
        state = host.state(key)
        if state == RESIDENT:
            return None
        if state == READING:
            return host.reading[key]
        r = self._issue_read(key, priority, t_s, token, layer, priority == PREFETCH)
        if priority == PREFETCH:
            self.count_host_prefetch(r)
        return r

    def count_host_prefetch(self, read: Transfer | None) -> bool:
        """Count a prefetch into host memory (`prefetch.into=host`), issued as `read` or, None, skipped
        for want of a slot (every machine counts them here); True if issued."""
        if read is None:
            self.host_prefetch_skipped += 1
            return False
        self.host_prefetches += 1
        return True

    def wait_started(self, tr: Transfer) -> None:
        """Apply events ahead until `tr` is on a channel (`CopyLink.wait_started`)."""
        heap = self.running_heap
        while tr.start_s < 0.0:
            assert heap, f"tiers: transfer {tr.key} waits with nothing scheduled"
            self.advance(heap[0][0], lookahead=True)

    def preempt(self, tr: Transfer, t_s: float, chunk_bytes: float) -> float:
        """Cut a running device copy at its first chunk boundary at or after `t_s` (`CopyLink.preempt`)."""
        copy = self.copy
        assert tr.started and not tr.done and t_s >= tr.start_s, f"tiers: cannot preempt {tr.key}"
        chunk_s = chunk_bytes / copy.bandwidth_Bps
        body0 = tr.start_s + copy.latency_s
        n = max(0, -(-(t_s - body0) // chunk_s)) if t_s > body0 else 0
        new_done = min(tr.done_s, body0 + n * chunk_s if n else max(t_s, body0))
        copy.busy_s -= tr.done_s - new_done
        copy.bytes_moved -= (tr.done_s - new_done) * copy.bandwidth_Bps
        tr.done_s = new_done
        tr.cancelled = True
        heap = self.running_heap
        heap[:] = [(new_done if x is tr and k == COPY_DONE else d, o, k, x) for d, o, k, x in heap]
        heapq.heapify(heap)
        return new_done

    def busy_channels(self) -> int:
        return self.copy.busy

    def running(self) -> list[Transfer]:
        return [x for _, _, k, x in self.running_heap if k == COPY_DONE]

    @property
    def queued(self) -> int:
        return len(self.copy.queues[0]) + len(self.copy.queues[1])

    def storage_stall(self, tr: Transfer, wait_from_s: float, stall_s: float, decode: bool = True) -> None:
        """Of a stall of `stall_s` from `wait_from_s` for copy `tr`, the part while its expert was
        still being read from storage is the read hop's (the rest of a token's stall is the device
        hop's: the summary subtracts). `decode`: a decode token's stall (else a prefill's or a
        batched step's, kept apart)."""
        r = tr.source
        if r is not None and r.done_s > wait_from_s:
            part = min(r.done_s - wait_from_s, stall_s)
            if decode:
                self.read.stall_s += part
            else:
                self.stall_other_s += part

    def host_figures(self, makespan_s: float) -> dict[str, float | int]:
        """The host cache's counters and each hop's utilisation and concurrency over the run."""
        host, read, copy = self.host, self.read, self.copy
        span = makespan_s if makespan_s > 0 else float("nan")
        return {
            "host_cache_hit_rate": host.hits / host.accesses if host.accesses else float("nan"),
            "host_cache_late_share": host.late / host.accesses if host.accesses else float("nan"),
            "host_cache_accesses": host.accesses,
            "host_reads": host.reads,
            "host_reads_bypassed": host.bypass,
            "host_cache_evictions": host.evictions,
            "host_cache_peak_slots": host.peak,
            "host_prefetches": self.host_prefetches,
            "host_prefetch_skipped": self.host_prefetch_skipped,
            "link_utilization_storage_to_host": read.busy_s / (span * read.channels),
            "link_utilization_host_to_device": copy.busy_s / (span * copy.channels),
            "link_max_concurrent_storage_to_host": max_overlap(self.reads.col("start_s"), self.reads.col("end_s")),
        }

    def serving_summary(self, copies: LoadLog, output_tokens: int, makespan_s: float) -> dict[str, float | int | None]:
        """A serving run's per-tier figures: per output token, every step's loads included (as
        `bytes_loaded_per_output_token`); the storage part of every step's stalls in seconds (batched
        steps and the single decode steps the serving loop runs as a replay's)."""
        per = (lambda x: x / output_tokens) if output_tokens else (lambda x: None)
        return {**self.host_figures(makespan_s),
                "link_max_concurrent": max_overlap(copies.col("start_s"), copies.col("end_s")),
                "bytes_per_output_token_storage_to_host": per(float(self.reads.col("moved").sum())),
                "bytes_per_output_token_host_to_device": per(float(copies.col("moved").sum())),
                "stall_s_storage_to_host": self.read.stall_s + self.stall_other_s}

    def summary(self, decoded: list[int], copies: LoadLog, stall_s_decode: float,
                makespan_s: float) -> dict[str, float | int]:
        """The per-tier figures of a run (docs/metrics.md): per decode token of `decoded` (trace rows),
        `copies` the device copies' log (the ledger's loads), `stall_s_decode` the decode tokens' stall."""
        copies_moved = copies.moved_by_token()
        n = max(1, len(decoded))
        read = self.read
        reads_moved = self.reads.moved_by_token()
        read_bytes = sum(reads_moved.get(t, 0.0) for t in decoded)
        copy_bytes = sum(copies_moved.get(t, 0.0) for t in decoded)
        return {
            **self.host_figures(makespan_s),
            # transfers on a hop at once, from their [start, end) intervals: a channel handed over at one
            # instant counts once, however the machine ordered the two events of that instant
            "link_max_concurrent": max_overlap(copies.col("start_s"), copies.col("end_s")),
            "bytes_per_token_storage_to_host": read_bytes / n,
            "bytes_per_token_host_to_device": copy_bytes / n,
            "stall_s_per_token_storage_to_host": read.stall_s / n,
            "stall_s_per_token_host_to_device": max(0.0, stall_s_decode - read.stall_s) / n,
            "stall_s_storage_to_host_other": self.stall_other_s,
        }


def max_overlap(starts, ends) -> int:
    """The most half-open intervals [start, end) that overlap at any instant (0 for none)."""
    import numpy as np

    ok = np.asarray(starts) >= 0.0
    if not ok.any():
        return 0
    t = np.concatenate([np.asarray(starts)[ok], np.asarray(ends)[ok]])
    d = np.concatenate([np.ones(int(ok.sum()), np.int64), -np.ones(int(ok.sum()), np.int64)])
    order = np.lexsort((d, t))  # at one instant, ends (-1) before starts (+1)
    return int(np.cumsum(d[order]).max())
