"""The copy worker: real transfers from the store into slot buffers, one at a time per channel.

Transfers are the engine's `sim.engine.transfer.Transfer`. States (as in `sim/engine/link.py`): QUEUED (in the priority queue) -> ACTIVE (a worker is
copying it; `start_s` set) -> DONE (`done_s` set; the owner applies it in `advance`). A queued
transfer with a lower `priority` starts first (demand 0 before prefetch 1), ties in issue order;
a transfer in flight is never stopped unless the owner asks (`request_cancel`, for prefetch
policies that yield to demand loads): the worker then stops at its next chunk boundary and the
transfer ends `cancelled`. Each channel is a thread (on CUDA the thread issues the copy on its
own stream and waits for its event), so `channels` transfers run at once.

Completions are applied lazily by the owner (the engine's main thread) in `advance()`, in the
order they finished, exactly where the simulator calls `CopyLink.advance(t)`.

A tiered run (`sim/realrun/tiers.py`) runs two of these: the storage reads (disk -> host buffers,
one thread per `storage_to_host` channel, every read in chunks when pipelined: `chunk_all`) and the
device copies (host buffers -> slots, one thread per `host_to_device` channel). A copy that follows
a read is made by the owner (`hold`: a Transfer, not queued) and queued by the read's worker thread
(`queue`) when the read ends, or once its first chunk is in: the hooks `on_chunk(tr, bytes so far)`
and `on_finish(tr, ok)` run in the worker thread, `on_finish` once the transfer is listed done (so
the owner never applies a copy that follows a read before that read). Within one priority, transfers start in the order they were
queued (the simulator's hops queue them in that order too).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable
from typing import Any

from sim.engine.transfer import DEMAND, PREFETCH, Transfer

__all__ = ["CopyWorker", "DEMAND", "PREFETCH", "Transfer"]


class CopyWorker:
    """A priority link with `channels` worker threads copying `store` experts into `pool` buffers."""

    def __init__(self, store, pool, clock: Callable[[], float], *, channels: int = 1,
                 chunk_bytes: float = 0.0, on_done: Callable[[Transfer], None] | None = None,
                 route: Callable[[Transfer], tuple[Any, list]] | None = None, chunk_all: bool = False,
                 on_chunk: Callable[[Transfer, float], None] | None = None,
                 on_finish: Callable[[Transfer, bool], None] | None = None, name: str = "copy"):
        """`route(tr)`: (the store to read, the destination matrices) of a copy; default `store` into
        `pool.matrices(tr.buf)`. `chunk_all`: every transfer in chunks of `chunk_bytes` (else only
        prefetches, so that they can be cut); `on_chunk`, `on_finish`: worker-thread hooks (module
        docstring)."""
        self.store, self.pool, self.clock = store, pool, clock
        self.channels = channels
        self.chunk_bytes = chunk_bytes  # prefetches are copied in chunks of this size (0: whole matrices)
        self.chunk_all = chunk_all
        self.on_done = on_done
        self.route = route
        self.on_chunk, self.on_finish = on_chunk, on_finish
        self.cond = threading.Condition()
        self._queue: list[tuple[int, int, Transfer]] = []
        self._running: list[Transfer] = []
        self._completed: list[Transfer] = []
        self.moved: dict[int, float] = {}  # seqno -> bytes copied so far (read by the owner once done: `moved_of`)
        self._seq = 0
        self._order = 0  # queueing order (ties within a priority)
        self._stop = False
        self.error: BaseException | None = None
        self.busy_s = 0.0
        self.bytes_moved = 0.0
        self.max_active = 0
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(channels)]
        for th in self._threads:
            th.start()

    # ------------------------------------------------------------------ worker side
    def _loop(self) -> None:
        backend = getattr(self.store, "backend", None)
        if backend is not None:
            try:
                backend.enter_worker_thread()
                backend.warm_copy_thread()
            except BaseException as err:  # surfaced in the main thread by wait/advance, not a silent hang
                self.error = err
        while True:
            with self.cond:
                while not self._queue and not self._stop:
                    self.cond.wait()
                if self._stop:
                    return
                tr = heapq.heappop(self._queue)[2]
                tr.start_s = self.clock()
                self._running.append(tr)
                self.max_active = max(self.max_active, len(self._running))
            ok = False
            try:
                if tr.after is not None:  # compute issued before the eviction must finish reading the slot
                    tr.after.synchronize()
                    tr.start_s = self.clock()  # the copy starts now: its time excludes that wait
                store, dests = (self.store, self.pool.matrices(tr.buf)) if self.route is None else self.route(tr)
                ok = store.read_into(
                    tr.key, dests, progress=lambda i, tr=tr: self._progress(tr, i),
                    cancelled=lambda tr=tr: tr.cancel_requested,
                    chunk_bytes=self.chunk_bytes if tr.priority == PREFETCH or self.chunk_all else 0,
                    on_bytes=lambda n, tr=tr: self._moved(tr, n))
            except BaseException as err:  # surfaced in the main thread by wait/advance
                self.error = err
            tr.done_s = self.clock()
            with self.cond:
                tr.done, tr.cancelled = True, not ok
                self._running.remove(tr)
                self._completed.append(tr)
                self.busy_s += tr.done_s - tr.start_s
                self.bytes_moved += self.moved.get(tr.seqno, 0.0)
                self.cond.notify_all()
            if self.on_finish is not None:  # (a tiered run's read: its copies are queued now, once the
                try:  # read is listed done: a copy that ends at once cannot be applied before its read)
                    self.on_finish(tr, ok)
                except BaseException as err:
                    self.error = err

    def _moved(self, tr: Transfer, nbytes: int) -> None:
        total = self.moved[tr.seqno] = self.moved.get(tr.seqno, 0.0) + nbytes
        if self.on_chunk is not None:
            self.on_chunk(tr, total)

    def _progress(self, tr: Transfer, i: int) -> None:
        with self.cond:
            tr.progress = i
            self.cond.notify_all()

    # ------------------------------------------------------------------ owner side
    def submit(self, key: int, nbytes: float, priority: int, buf: int, *, staging: bool = False, token: int = -1,
               layer: int = -1, after: Any = None) -> Transfer:
        """Queue a copy of expert `key` into pool buffer `buf`; `after` (CUDA) an event the copy waits for."""
        tr = self.hold(key, nbytes, priority, buf, staging=staging, token=token, layer=layer, after=after)
        self.queue(tr)
        return tr

    def hold(self, key: int, nbytes: float, priority: int, buf: int, *, staging: bool = False, token: int = -1,
             layer: int = -1, after: Any = None) -> Transfer:
        """A copy of expert `key` into pool buffer `buf`, issued now (its seqno) but not queued: `queue` it
        when it may start (a tiered run's copy that follows a storage read)."""
        with self.cond:
            self._seq += 1
            return Transfer(key, nbytes, priority, staging, token, layer, self.clock(), self._seq, buf=buf, after=after)

    def queue(self, tr: Transfer) -> None:
        """Queue a transfer made elsewhere (`hold`, or a tiered run's read); any thread may call it."""
        with self.cond:
            assert not self._stop, f"{tr.key} queued on a closed worker"
            self._order += 1
            heapq.heappush(self._queue, (tr.priority, self._order, tr))
            self.cond.notify_all()

    def advance(self) -> None:
        """Apply every completion so far (the owner's `on_done`), in completion order."""
        self._check()
        with self.cond:
            done, self._completed = self._completed, []
        if self.on_done is not None:
            for tr in done:
                self.on_done(tr)

    def moved_of(self, tr: Transfer) -> float:
        """Bytes `tr` really copied (all of them, unless it was cut short); forgets it."""
        with self.cond:
            return self.moved.pop(tr.seqno, 0.0)

    def busy_channels(self) -> int:
        """Channels busy or about to be (queued transfers count: a worker is picking them up)."""
        with self.cond:
            return min(self.channels, len(self._running) + len(self._queue))

    def running(self) -> list[Transfer]:
        with self.cond:
            return list(self._running)

    def request_cancel(self, tr: Transfer) -> None:
        tr.cancel_requested = True

    def wait_all(self) -> None:
        """Block until nothing is queued or copying."""
        with self.cond:
            while self._queue or self._running:
                self.cond.wait(0.5)
                self._check()
                if not any(th.is_alive() for th in self._threads):
                    raise RuntimeError("every copy worker thread has ended with copies still queued")
        self._check()

    def wait(self, tr: Transfer, matrices: int | None = None) -> None:
        """Block until `tr` is done (or has its first `matrices` matrices in)."""
        with self.cond:
            while not tr.done and (matrices is None or tr.progress < matrices):
                if self._stop and not tr.started:
                    raise RuntimeError(f"copy worker stopped while expert {tr.key}'s copy was still queued")
                self.cond.wait(0.5)
                self._check()
                if not tr.done and not any(th.is_alive() for th in self._threads):
                    raise RuntimeError(f"every copy worker thread has ended; expert {tr.key}'s copy never will")
        self._check()

    def order_key(self, tr: Transfer) -> tuple:
        """Where `tr` finishes relative to the others, as far as known now (done < active < queued <
        waiting for its storage read, in a tiered run)."""
        if tr.done:
            return (0, tr.done_s, 0, 0)
        if tr.started:
            return (1, tr.start_s, 0, 0)
        if tr.source is not None and not tr.source.done:
            return (3, tr.source.seqno, tr.priority, tr.seqno)
        return (2, 0.0, tr.priority, tr.seqno)

    def _check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        for th in self._threads:
            th.join(timeout=10)
