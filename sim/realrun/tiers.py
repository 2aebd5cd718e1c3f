"""The real run's host tier: disk -> host buffers -> device slots, with the simulator's books (docs/tiers.md).

A tiered real run (`store=disk` on a profile whose hierarchy the runner decided has a host cache)
executes for real what `sim.engine.tiers.TierLink` schedules in the simulator. The engine's
`TierLink` is used only as the books: its `HostCache` (`host`, the policy warm-started by the
runner) decides, its `reads` log and its hop counters (`read`, `copy`: `busy_s`, `bytes_moved`,
`max_active`, `stall_s`; `host_prefetches`, `host_prefetch_skipped`, `stall_other_s`) are filled,
so `TierLink.summary` / `serving_summary` and `Recorder.events_frame(E, tiers)` give the real
run's per-tier figures exactly as for a simulated one.

What runs where:

    host buffers   `HostPool`: `host_cache.slots` expert buffers (pinned on CUDA) for the host
                   cache, plus bounce buffers for the reads that get no slot (`host_reads_bypassed`)
    read worker    a `CopyWorker` with one thread per `storage_to_host` channel: a read fills a
                   host buffer from the `DiskStore` (page cache dropped before and after, as today)
    copy worker    the machine's `CopyWorker`, one thread per `host_to_device` channel: a copy
                   fills a device slot from the host buffer (`HostSource`)

Decisions are the main thread's, where the simulator makes them: a device load (`load`), a CPU
job (`cpu_reads`), a prefetch into host memory (`prefetch_host`) look the expert up, pin it and,
when it is absent, admit a read (a victim evicted: its host buffer is freed at once, since an
evictable expert has no copy or CPU job pending). Completions of reads are applied by the main
thread in completion order (`apply`, as `CopyWorker.advance` applies copies): the host cache's
`read_done`, the reads log, the read hop's counters.

The rules (`tests/test_tiers.py` states them for the simulator):
- a read takes its host buffer when it is issued; one read per expert in flight (a later load or
  CPU job follows it);
- whole (`tiers.pipelined=false`): a copy that follows a read is queued by the read's worker thread
  when the read ends; pipelined: once the read's first chunk is in, and the copy, chunk by chunk
  (`tiers.chunks` per expert), copies only bytes already read: it holds its channel while it waits,
  and ends after the read does;
- demand before prefetch on each hop, each in queueing order (`CopyWorker`);
- a copy pins its expert in host memory until it ends (applied), a CPU job until `cpu_done`; a
  bounce buffer is given back once its read is applied and no copy or CPU job still reads it;
- a CPU job waits for its experts' reads (`wait_read`, in the CPU worker's thread).

States of a read: QUEUED -> ACTIVE (a read thread fills its buffer; `read_in` counts the bytes in)
-> ENDED (`done_s` set; its followers released) -> DONE (`done`) -> APPLIED (the books: `apply`).
Errors: a read that fails still ends (its followers copy what is there) and its error is raised
in the main thread by the next `apply`; nothing waits forever on it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch

from sim.engine.host import ABSENT, READING, RESIDENT
from sim.engine.tiers import TierLink
from sim.engine.transfer import DEMAND, PREFETCH, Transfer
from sim.realrun.backend import Backend
from sim.realrun.link import CopyWorker
from sim.realrun.store import DiskStore, Layout, _bytes_view, _chunks, device_copy

ENDED = math.inf  # `read_in` of a read that has ended


class HostPool:
    """Host-memory expert buffers (pinned on CUDA, so that copies from them are DMA): the first `n`
    in one allocation per matrix (zero-filled, so every page is mapped before the clock starts), and
    more made when every one is taken (bounce buffers beyond the host cache's own slots; counted in
    `grown`)."""

    def __init__(self, backend: Backend, layout: Layout, n: int):
        self.backend, self.layout = backend, layout
        self.n0 = n
        self.pools = [backend.host_empty((n, r, c), layout.torch_dtype).zero_() for r, c in layout.shapes]
        self.extra: list[list[torch.Tensor]] = []
        self.free = list(range(n - 1, -1, -1))
        self.taken = [False] * n
        self.in_use = self.peak = self.grown = 0

    @property
    def size(self) -> int:
        return self.n0 + len(self.extra)

    def matrices(self, buf: int) -> list[torch.Tensor]:
        if buf < self.n0:
            return [p[buf] for p in self.pools]
        return self.extra[buf - self.n0]

    def take(self) -> int:
        if not self.free:
            self.extra.append([self.backend.host_empty(s, self.layout.torch_dtype).zero_() for s in self.layout.shapes])
            self.taken.append(False)
            self.grown += 1
            self.free.append(self.size - 1)
        self.in_use += 1
        self.peak = max(self.peak, self.in_use)
        buf = self.free.pop()
        self.taken[buf] = True
        return buf

    def give(self, buf: int) -> None:
        assert 0 <= buf < self.size and self.taken[buf], f"host buffer {buf} given back twice"
        self.taken[buf] = False
        self.in_use -= 1
        self.free.append(buf)


class DiskToHost:
    """The read worker's store: the `DiskStore` read straight into host buffers (`into_host`)."""

    kind = "disk"

    def __init__(self, disk: DiskStore):
        self.disk, self.backend, self.layout = disk, disk.backend, disk.layout

    def read_into(self, key, dests, progress=None, cancelled=None, chunk_bytes=0, on_bytes=None) -> bool:
        return self.disk.read_into(key, dests, progress, cancelled, chunk_bytes, on_bytes, into_host=True)

    def close(self) -> None:
        self.disk.close()


class HostSource:
    """The source of one device copy: a host buffer (its expert's host slot, or the bounce buffer of
    the read it follows). Pipelined, while that read has not ended, each chunk is copied once the
    read has brought its bytes in (`RealTiers.wait_bytes`)."""

    kind = "host"

    def __init__(self, tiers: RealTiers, buf: int, read: Transfer | None):
        self.tiers, self.buf, self.read = tiers, buf, read
        self.backend = tiers.backend

    def read_into(self, key, dests, progress=None, cancelled=None, chunk_bytes=0, on_bytes=None) -> bool:
        tiers, r = self.tiers, self.read
        follow = tiers.pipelined and r is not None and not tiers.ended(r)
        offset = 0
        for i, (dst, src) in enumerate(zip(dests, tiers.pool.matrices(self.buf), strict=True)):
            d, s = _bytes_view(dst), _bytes_view(src)
            step = chunk_bytes
            if follow:  # no larger than the read's chunks: each is copied as soon as it is in
                step = min(step, tiers.chunk_bytes) if step > 0 else tiers.chunk_bytes
            for lo, hi in _chunks(d.numel(), step):
                if cancelled is not None and cancelled():
                    return False
                if follow:
                    tiers.wait_bytes(r, offset + hi)
                device_copy(self.backend, d[lo:hi], s[lo:hi])
                if on_bytes is not None:
                    on_bytes(hi - lo)
            offset += d.numel()
            if progress is not None:
                progress(i + 1)
        return True


class RealTiers:
    """The host tier of one tiered real run (module docstring). Main-thread operations: `warm`,
    `load`, `cpu_reads`, `cpu_done`, `prefetch_host`, `apply`, `copy_done`, `source`, `finish`,
    `close`; the read worker's threads call `_chunk_in` and `_ended`; any thread `wait_read`."""

    def __init__(self, books: TierLink, disk: DiskStore, backend: Backend, clock: Callable[[], float],
                 copies: CopyWorker, spare: int):
        """`books`: the engine's `TierLink`; `copies`: the machine's copy worker (host -> device);
        `spare`: bounce buffers made before the clock starts (more are made if a run needs them)."""
        assert isinstance(disk, DiskStore), "a tiered real run reads its experts from the disk store"
        assert disk.layout.expert_bytes == books.read_bytes, (
            f"the store's experts are {disk.layout.expert_bytes} bytes, the books' {books.read_bytes}")
        self.books, self.host, self.disk, self.backend, self.clock = books, books.host, disk, backend, clock
        self.copies = copies
        self.pipelined = books.pipelined
        self.chunk_bytes = books.chunk_bytes
        self.pool = HostPool(backend, disk.layout, books.host.slots + spare)
        self.buf_of: dict[int, int] = {}  # expert in the host cache (resident, or read into a slot) -> its buffer
        self.reader = CopyWorker(DiskToHost(disk), self.pool, clock, channels=books.read.channels,
                                 chunk_bytes=self.chunk_bytes if self.pipelined else 0.0, chunk_all=True,
                                 on_done=self._applied, on_chunk=self._chunk_in, on_finish=self._ended,
                                 name="read")
        self.lock = threading.Lock()  # `followers` and `released`, shared with the read threads
        self.followers: dict[int, list[Transfer]] = {}  # read seqno -> the copies queued when it lets them
        self.released: set[int] = set()  # reads whose copies may start (ended; pipelined: first chunk in)
        self.progress = threading.Condition()  # `read_in`, for pipelined copies and CPU jobs
        self.read_in: dict[int, float] = {}  # read seqno -> bytes in host memory so far (ENDED once it ended)
        self.bounce: dict[int, list] = {}  # bounce read seqno -> [copies and CPU jobs reading it, applied]
        self.src: dict[int, tuple[int, Transfer | None]] = {}  # copy seqno -> (host buffer, the read it follows)
        self.slots_peak = 0  # the most host-cache buffers held at once (resident and being read into a slot)

    # ------------------------------------------------------------------ before the clock
    def warm(self) -> None:
        """The host policy's warm residents (`static`: the trace's most routed experts) are read into
        host buffers now, before the clock starts, as the simulator has them in place at time 0."""
        for key in sorted(self.host.resident):
            self.buf_of[key] = buf = self.pool.take()
            self.disk.read_into(key, self.pool.matrices(buf), into_host=True)
        self.slots_peak = len(self.buf_of)

    # ------------------------------------------------------------------ the main thread's decisions
    def load(self, tr: Transfer) -> None:
        """A device copy `tr` (held, not queued): from host memory at once, or after its expert's read
        (the one in flight, or a new one at the copy's priority)."""
        self.apply()  # the reads that ended by now: the host cache as of now
        host = self.host
        where = host.lookup(tr.key, tr.token)
        host.pin(tr.key)
        if where == RESIDENT:
            self.src[tr.seqno] = (self.buf_of[tr.key], None)
            self.copies.queue(tr)
            return
        r = host.reading[tr.key] if where == READING else self._read(tr.key, tr.priority, tr.token, tr.layer, False)
        tr.source = r
        self.src[tr.seqno] = (r.buf, r)
        self._use(r)
        with self.lock:
            now = r.seqno in self.released
            if not now:
                self.followers.setdefault(r.seqno, []).append(tr)
        if now:
            self.copies.queue(tr)

    def cpu_reads(self, keys: list[int], t: int, layer: int) -> list[tuple[int, int, Transfer | None]]:
        """A CPU job on `keys` at row t: each looked up and pinned in host memory; the experts not
        there are read first (the read in flight, or a demand read now). Returns (key, its host
        buffer, the read it waits for or None) per key."""
        self.apply()
        host, out = self.host, []
        for key in keys:
            where = host.lookup(key, t)
            host.pin(key)
            if where == RESIDENT:
                out.append((key, self.buf_of[key], None))
                continue
            r = host.reading[key] if where == READING else self._read(key, DEMAND, t, layer, False)
            self._use(r)
            out.append((key, r.buf, r))
        return out

    def cpu_done(self, jobs: list[tuple[int, int, Transfer | None]]) -> None:
        """The CPU job of `cpu_reads` has ended: its pins and bounce buffers go."""
        for key, _, r in jobs:
            self.host.unpin(key)
            if r is not None:
                self._unuse(r)

    def prefetch_host(self, key: int, t: int, layer: int) -> bool:
        """(`prefetch.into=host`) Read `key` into host memory unless it is there or on its way; False
        if no host slot could be freed (the prefetch is skipped), as the simulator's machines count it."""
        self.apply()
        if self.host.state(key) != ABSENT:
            return True
        return self.books.count_host_prefetch(self._read(key, PREFETCH, t, layer, True))

    def _read(self, key: int, priority: int, t: int, layer: int, prefetch: bool) -> Transfer | None:
        """A storage read of `key` into a host buffer (a host-cache slot, or a bounce buffer when none
        can be freed); None: a prefetch found no slot."""
        host, books = self.host, self.books
        assert key not in self.buf_of, f"expert {key} is read from storage while it is in host memory"
        evictions = host.evictions
        r = books.new_read(key, priority, t, layer, self.clock(), prefetch)  # admitted and booked
        if host.evictions != evictions:
            self._free_evicted(host.evictions - evictions)
        if r is None:
            return None
        cached = not r.staging
        r.buf = self.pool.take()
        if cached:
            self.buf_of[key] = r.buf
            assert len(self.buf_of) <= host.slots, (
                f"{len(self.buf_of)} experts hold host-cache buffers, the host cache has {host.slots} slots")
            self.slots_peak = max(self.slots_peak, len(self.buf_of))
        else:
            self.bounce[r.seqno] = [0, False]
        with self.progress:
            self.read_in[r.seqno] = 0.0
        self.reader.queue(r)
        return r

    def _free_evicted(self, n: int) -> None:
        """The host cache evicted `n` experts: their host buffers go back (none is pinned: no copy or
        CPU job reads it)."""
        host = self.host
        gone = [k for k in self.buf_of if k not in host.resident and k not in host.reading]
        assert len(gone) == n, f"the host cache evicted {n} expert(s); {len(gone)} buffer(s) lost their expert"
        for key in gone:
            assert not host.pins.get(key), f"evicted expert {key} is still pinned"
            self.pool.give(self.buf_of.pop(key))

    def _use(self, r: Transfer) -> None:
        if r.staging:
            self.bounce[r.seqno][0] += 1

    def _unuse(self, r: Transfer) -> None:
        if r.staging:
            b = self.bounce[r.seqno]
            b[0] -= 1
            assert b[0] >= 0, f"bounce buffer of read {r.seqno} released twice"
            self._maybe_give(r)

    def _maybe_give(self, r: Transfer) -> None:
        b = self.bounce[r.seqno]
        if b[1] and b[0] == 0:  # applied (no one can follow it any more) and no one reads it
            del self.bounce[r.seqno]
            self.pool.give(r.buf)

    # ------------------------------------------------------------------ completions (main thread)
    def apply(self) -> None:
        """Apply the reads that have ended, in completion order (raises a read thread's error)."""
        self.reader.advance()

    def _applied(self, r: Transfer) -> None:
        """(the read worker's `on_done`, in `apply`) A read ended: the host cache's books, its log row,
        the read hop's counters; a bounce buffer goes if no copy or CPU job reads it."""
        moved = self.reader.moved_of(r)
        books = self.books
        self.host.read_done(r)
        books.reads.finish(r, moved)
        hop = books.read
        hop.busy_s += r.done_s - r.start_s
        hop.bytes_moved += moved
        with self.lock:
            self.released.discard(r.seqno)
        with self.progress:
            self.read_in.pop(r.seqno, None)
        if r.staging:
            self.bounce[r.seqno][1] = True
            self._maybe_give(r)

    def copy_done(self, tr: Transfer, moved: float) -> None:
        """A device copy ended (applied by the machine, in completion order): its host pin goes, the
        copy hop's counters."""
        self.host.unpin(tr.key)
        _, r = self.src.pop(tr.seqno)
        if r is not None:
            self._unuse(r)
        hop = self.books.copy
        hop.busy_s += tr.done_s - tr.start_s
        hop.bytes_moved += moved

    def source(self, tr: Transfer) -> HostSource:
        """(the copy worker's thread) Where copy `tr` reads from."""
        buf, r = self.src[tr.seqno]
        return HostSource(self, buf, r)

    def finish(self) -> None:
        """Wait for every read (their copies are then queued) and apply them; the counters of both hops."""
        self.reader.wait_all()
        self.apply()
        self.books.read.max_active = self.reader.max_active
        self.books.copy.max_active = self.copies.max_active

    def close(self) -> None:
        self.reader.close()
        self.reader.on_done = self.reader.on_chunk = self.reader.on_finish = None  # (they held this object)

    # ------------------------------------------------------------------ the read threads
    def _chunk_in(self, r: Transfer, total_bytes: float) -> None:
        with self.progress:
            self.read_in[r.seqno] = total_bytes
            self.progress.notify_all()
        if self.pipelined:  # its first chunk is in: its copies may start
            self._release(r)

    def _ended(self, r: Transfer, ok: bool) -> None:
        with self.progress:
            self.read_in[r.seqno] = ENDED
            self.progress.notify_all()
        self._release(r)

    def _release(self, r: Transfer) -> None:
        with self.lock:
            if r.seqno in self.released:
                return
            self.released.add(r.seqno)
            waiting = self.followers.pop(r.seqno, ())
        for c in waiting:
            self.copies.queue(c)

    # ------------------------------------------------------------------ any thread
    def ended(self, r: Transfer) -> bool:
        return r.done or self.read_in.get(r.seqno, ENDED) == ENDED

    def wait_bytes(self, r: Transfer, nbytes: float) -> None:
        """Block until read `r` has brought `nbytes` of its expert into host memory (or has ended)."""
        with self.progress:
            while not r.done and self.read_in.get(r.seqno, ENDED) < nbytes:
                self.progress.wait(0.5)

    def wait_read(self, r: Transfer) -> None:
        """Block until read `r` has ended (a CPU job computes from its buffer then)."""
        self.wait_bytes(r, ENDED)

    def facts(self) -> dict[str, float | int]:
        """The real host tier's own figures (`realrun_host_*`): buffers made, the most in use, the most
        host-cache buffers held at once."""
        return {"realrun_host_buffers": self.pool.size, "realrun_host_buffers_peak": self.pool.peak,
                "realrun_host_bounce_grown": self.pool.grown, "realrun_host_slots_peak": self.slots_peak}
