"""The copy worker: real transfers from the store into slot buffers, one at a time per channel.

States of a transfer (as in `sim/engine/link.py`): QUEUED (in the priority queue) -> ACTIVE (a worker is
copying it; `start_s` set) -> DONE (`done_s` set; the owner applies it in `advance`). A queued
transfer with a lower `priority` starts first (demand 0 before prefetch 1), ties in issue order;
a transfer in flight is never stopped unless the owner asks (`request_cancel`, for prefetch
policies that yield to demand loads): the worker then stops at its next chunk boundary and the
transfer ends `cancelled`. Each channel is a thread (on CUDA the thread issues the copy on its
own stream and waits for its event), so `channels` transfers run at once.

Completions are applied lazily by the owner (the engine's main thread) in `advance()`, in the
order they finished, exactly where the simulator calls `CopyLink.advance(t)`.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEMAND, PREFETCH = 0, 1


@dataclass(eq=False)
class RealTransfer:
    """One copy of expert `key` into pool buffer `buf` (field names as `sim.engine.link.Transfer`)."""

    key: int
    nbytes: float
    priority: int
    issued_s: float
    seqno: int
    tag: Any  # (kind, token, layer, staging), as the simulator's
    buf: int
    start_s: float = -1.0
    done_s: float = -1.0
    done: bool = False
    cancelled: bool = False
    cancel_requested: bool = False
    progress: int = 0  # matrices fully copied
    applied: bool = False  # the owner has seen its completion (set by the owner's on_done)
    after: Any = None  # CUDA: an event on the compute stream that the copy must wait for

    @property
    def started(self) -> bool:
        return self.start_s >= 0.0


class CopyWorker:
    """A priority link with `channels` worker threads copying `store` experts into `pool` buffers."""

    def __init__(self, store, pool, clock: Callable[[], float], *, channels: int = 1,
                 chunk_bytes: float = 0.0, on_done: Callable[[RealTransfer], None] | None = None):
        self.store, self.pool, self.clock = store, pool, clock
        self.channels = channels
        self.chunk_bytes = chunk_bytes  # prefetches are copied in chunks of this size (0: whole matrices)
        self.on_done = on_done
        self.cond = threading.Condition()
        self._queue: list[tuple[int, int, RealTransfer]] = []
        self._running: list[RealTransfer] = []
        self._completed: list[RealTransfer] = []
        self._seq = 0
        self._stop = False
        self.error: BaseException | None = None
        self.busy_s = 0.0
        self.bytes_moved = 0.0
        self.max_active = 0
        self._threads = [threading.Thread(target=self._loop, name=f"copy-{i}", daemon=True)
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
                ok = self.store.read_into(
                    tr.key, self.pool.matrices(tr.buf), progress=lambda i, tr=tr: self._progress(tr, i),
                    cancelled=lambda tr=tr: tr.cancel_requested,
                    chunk_bytes=self.chunk_bytes if tr.priority == PREFETCH else 0)
            except BaseException as err:  # surfaced in the main thread by wait/advance
                self.error = err
            with self.cond:
                tr.done_s = self.clock()
                tr.done, tr.cancelled = True, not ok
                self._running.remove(tr)
                self._completed.append(tr)
                self.busy_s += tr.done_s - tr.start_s
                if ok:
                    self.bytes_moved += tr.nbytes
                self.cond.notify_all()

    def _progress(self, tr: RealTransfer, i: int) -> None:
        with self.cond:
            tr.progress = i
            self.cond.notify_all()

    # ------------------------------------------------------------------ owner side
    def submit(self, key: int, nbytes: float, priority: int, tag: Any, buf: int, after: Any = None) -> RealTransfer:
        with self.cond:
            self._seq += 1
            tr = RealTransfer(key, nbytes, priority, self.clock(), self._seq, tag, buf, after=after)
            heapq.heappush(self._queue, (priority, tr.seqno, tr))
            self.cond.notify_all()
        return tr

    def advance(self) -> None:
        """Apply every completion so far (the owner's `on_done`), in completion order."""
        self._check()
        with self.cond:
            done, self._completed = self._completed, []
        if self.on_done is not None:
            for tr in done:
                self.on_done(tr)

    def busy_channels(self) -> int:
        """Channels busy or about to be (queued transfers count: a worker is picking them up)."""
        with self.cond:
            return min(self.channels, len(self._running) + len(self._queue))

    def running(self) -> list[RealTransfer]:
        with self.cond:
            return list(self._running)

    def request_cancel(self, tr: RealTransfer) -> None:
        tr.cancel_requested = True

    def wait(self, tr: RealTransfer, matrices: int | None = None) -> None:
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

    def order_key(self, tr: RealTransfer) -> tuple:
        """Where `tr` finishes relative to the others, as far as known now (done < active < queued)."""
        if tr.done:
            return (0, tr.done_s, 0, 0)
        if tr.started:
            return (1, tr.start_s, 0, 0)
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
