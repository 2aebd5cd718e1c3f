"""The real machine: the steps of `sim/engine/step.py` with real copies, real kernels and the wall clock.

The engine (`sim.engine.engine.Engine`), its `Ledger` and the step description are the simulator's
own; this machine executes the operations where time passes, as SimPy's `RealtimeEnvironment` runs
the processes of an `Environment`:

    operation            here
    attention            the kernels' non-expert stand-in (a live model runs its own: no-op)
    attention_batch      the same for a serving step's batch (each request's context)
    run_op               a modelled op with no kernel here (a draft model's `spec.draft_s`): waited out
    idle_until           nothing to run until a request arrives (serving): the wall clock is waited out
    compute              an expert from its pool buffer (returns its output)
    issue                a copy by the copy worker (`sim/realrun/link.py`) into a pool buffer
    settle, link_full    apply the copies that ended (`CopyWorker.advance`), in completion order
    arrived              the copy has ended (and was not cut)
    cut_a_prefetch       the one rule (`sim.engine.preempt`), transfer ends estimated from the
                         profile's link; the worker stops the chosen copy at its next chunk
    wait, wait_ended     block until the copy ends (returns the stall)
    first_to_arrive      the loaded expert that ends first as far as known now (done < copying < queued)
    compute_loaded       wait for the copy (per matrix when pipelining), then compute
    cpu_start, cpu_wait  the CPU worker (placement=cpu), beside the device's work
    prefetch_host        (tiered, `prefetch.into=host`) a read into a host buffer only
    token_done           CUDA: wait for the compute stream to run the token; its end

A tiered run (`spec` is the engine's `sim.engine.tiers.TierLink`: experts on disk behind a host
cache) sets `tiers` to that TierLink, the books of `sim.realrun.tiers.RealTiers`, which reads
experts from the disk into host buffers; `issue` then holds each copy until the tier queues it
(at once from host memory, or when its read lets it), the copy worker copies host buffer -> slot
with one thread per `host_to_device` channel, and `cpu_start` has the CPU job wait for its reads
and compute from the host buffers.

Every operation returns at once with its result (the main thread blocks in it), so a step never
yields. Memory: each cache entry and each staging transfer owns one buffer of the `SlotPool`
(`buf_of[key]` for cache keys, `tr.buf` for staging ones); the ledger tells this machine of
evictions, freed staging buffers and adopted ones (AdapMoE's used prefetch enters the cache by
handing its buffer over, no copy). A staging buffer freed while its copy is still running is kept
(`orphans`) until that copy ends. A low-precision copy (placement `low_precision_on_miss`) goes
into a buffer of a separate small pool, from the store's packed low-bit copies (`sim/realrun/low.py`).

Times are seconds from the end of the warm start (`now`); a stall is time the main thread spent
blocked on a copy. On CUDA compute busy time comes from CUDA events read at the end of each token,
and the compute intervals in `events.parquet` are the host's (launch) intervals.
"""

from __future__ import annotations

import time

from sim.engine.preempt import choose_cut
from sim.engine.tiers import TierLink
from sim.engine.transfer import Transfer
from sim.realrun.link import CopyWorker


class RealMachine:  # the contract: sim/engine/machine.py
    needs_weights = True  # the kernels compute outputs from real weights
    holds_memory = True  # the ledger tells it of evictions and freed buffers
    tiers = None  # a tiered run's `TierLink` (the books of `RealTiers`); None: one link from the store

    def __init__(self, backend, store, pool, kernels, spec, *, channels: int = 1, chunk_bytes: float = 0.0,
                 cpu_worker=None, pipelining: bool = False, low=None, host_spare: int = 0):
        """`spec`: the simulator's `CopyLink` for this run (its bandwidth and latency estimate when a
        copy in flight ends, for the preemption rule), or in a tiered run its `TierLink` (then
        `channels` must be its `host_to_device` channels, `store` the `DiskStore`, and `host_spare`
        bounce buffers are made before the clock starts); `low`: a `LowCopies` for low-precision loads."""
        self.backend, self.store, self.pool, self.k, self.cpu = backend, store, pool, kernels, cpu_worker
        self.spec, self.pipelining, self.low = spec, pipelining, low
        self.t0 = time.perf_counter()
        tiered = isinstance(spec, TierLink)
        assert not tiered or (low is None and channels == spec.copy.channels), (
            f"a tiered run copies with {spec.copy.channels} channel(s) and no low-precision copies")
        self.link = CopyWorker(store, pool, self._clock, channels=channels, chunk_bytes=chunk_bytes,
                               on_done=self._on_done, route=self._route if low is not None or tiered else None)
        self.host_tier = None
        if tiered:
            from sim.realrun.tiers import RealTiers

            self.tiers = spec
            self.host_tier = RealTiers(spec, store, backend, self._clock, self.link, host_spare)
        self._cpu_jobs = None  # (tiered) the running CPU job's (key, host buffer, read) per expert
        self.ledger = None
        self.buf_of: dict[int, int] = {}  # cache key (loading or resident) -> its pool buffer
        self.orphans: set[Transfer] = set()  # staging buffers freed while their copy still runs
        self.compute_busy_s = 0.0
        self._busy_pairs: list = []  # CUDA: (start event, end event, idle s) not yet added up
        self._cpu_ready_s = 0.0

    def attach(self, ledger) -> None:
        self.ledger = ledger

    def _clock(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def now(self) -> float:
        return time.perf_counter() - self.t0

    # ------------------------------------------------------------------ the run
    def warm(self, keys: list[int]) -> None:
        """The warm-start residents, copied in before the clock starts (which it then does); in a
        tiered run the host cache's warm residents are read into host buffers first."""
        if self.host_tier is not None:
            self.host_tier.warm()
        for key in keys:
            self.buf_of[key] = buf = self.pool.take()
            self.store.read_into(key, self.pool.matrices(buf))
        self.backend.sync_all()
        self.t0 = time.perf_counter()

    def run(self, process) -> None:
        for _ in process:
            raise AssertionError("a step yielded an event on the real machine, whose operations block")

    def token_done(self) -> float:
        """The token's work is queued: wait for the compute stream (CUDA), read the end, then add up
        its busy time (after the end is read: reading CUDA events is not the token's time)."""
        self.backend.sync()
        end_s = self.now
        if self._busy_pairs:
            for a, b, idle_s in self._busy_pairs:
                self.compute_busy_s += max(0.0, a.elapsed_time(b) / 1e3 - idle_s)
            self._busy_pairs = []
        return end_s

    def finish(self) -> None:
        """Wait for every read and copy still queued or running, and apply them."""
        if self.host_tier is not None:
            self.host_tier.finish()  # every read ended: the copies that followed them are queued
        self.link.wait_all()
        self.link.advance()

    def close(self) -> None:
        if self.host_tier is not None:
            self.host_tier.close()
        self.link.close()
        self.link.on_done = self.link.route = None  # the link held this machine (a cycle): freed now, pinned buffers included
        if self.cpu is not None:
            self.cpu.close()

    # ------------------------------------------------------------------ compute busy time
    def _busy_begin(self):
        """Start timing one compute op: the host clock on the CPU; on CUDA an event on the compute
        stream (kernels run asynchronously, so host time would measure only their launches)."""
        if not self.backend.cuda:
            return time.perf_counter()
        import torch

        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _busy_end(self, begun, idle_s: float = 0.0) -> None:
        """End it; `idle_s` (a pipelined expert's waits for its matrices) is not busy time."""
        if not self.backend.cuda:
            self.compute_busy_s += time.perf_counter() - begun - idle_s
            return
        import torch

        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self._busy_pairs.append((begun, ev, idle_s))

    # ------------------------------------------------------------------ the compute stream
    def attention(self, layer: int, context: int, new_tokens: int) -> None:
        begun = self._busy_begin()
        self.k.attention(layer, context, new_tokens)
        self._busy_end(begun)

    def attention_batch(self, layer: int, pairs: list[tuple[int, int]]) -> None:
        begun = self._busy_begin()
        self.k.attention_batch(layer, pairs)
        self._busy_end(begun)

    def run_op(self, work) -> None:
        """An op the real run has no kernel for, given as a time only (a `sim.machine.cost.OpWork`
        with no bytes and no FLOPs: the draft model's `spec.k * spec.draft_s`): the compute stream
        is busy that long. An op with bytes or FLOPs has a kernel of its own (`attention_batch`)."""
        assert not work.nbytes and not work.matmul_s, "the real run times only modelled ops given as a duration"
        self.backend.sync()
        begun = time.perf_counter()
        _wait_until(begun + work.overhead_s)
        self.compute_busy_s += time.perf_counter() - begun

    def idle_until(self, t_s: float) -> None:
        """Nothing to run until `t_s` (a request's arrival, on this run's clock)."""
        _wait_until(self.t0 + t_s)

    def compute(self, key: int, tokens: int, weight: float):
        begun = self._busy_begin()
        out = self.k.expert(self.pool.matrices(self.buf_of[key]), weight, tokens)
        self._busy_end(begun)
        return out

    def compute_loaded(self, tr: Transfer, tokens: int, weight: float):
        """Compute an expert whose copy was issued; returns (its output, the stall it caused)."""
        stall = 0.0
        link = self.link

        def wait(i: int) -> None:
            nonlocal stall
            if tr.done or tr.progress >= i:
                return
            w0 = time.perf_counter()
            link.wait(tr, i)
            stall += time.perf_counter() - w0

        low = self._is_low(tr)
        if not self.pipelining or low:
            wait(len(self.pool.pools))
        begun = self._busy_begin()
        if low:
            out = self.k.expert(self.low.matrices(tr.buf, tr.key), weight, tokens)
        else:
            out = self.k.expert(self.pool.matrices(tr.buf), weight, tokens, wait)
        self._busy_end(begun, stall if self.pipelining and not low else 0.0)
        if self.host_tier is not None and not tr.done:  # (tiered) its data is in, the copy's worker is about to
            link.wait(tr)  # mark it done: wait, so that the next settle unpins its host expert, as the simulator
        return out, stall  # does at the copy's end (else a read could find that expert still pinned)

    def combine(self, outs):
        return self.k.combine(outs)

    # ------------------------------------------------------------------ the link
    def settle(self) -> None:
        if self.host_tier is not None:
            self.host_tier.apply()
        self.link.advance()

    def link_full(self) -> bool:
        self.settle()
        return self.link.busy_channels() >= self.link.channels

    def issue(self, key: int, nbytes: float, priority: int, staging: bool, t: int, layer: int) -> Transfer:
        if self.low is not None and staging and nbytes == self.low.nbytes:
            buf = self.low.take()
        else:
            buf = self.pool.take()
        if not staging:
            self.buf_of[key] = buf
        if self.host_tier is None:
            return self.link.submit(key, nbytes, priority, buf, staging=staging, token=t, layer=layer,
                                    after=self._slot_free_event())
        tr = self.link.hold(key, nbytes, priority, buf, staging=staging, token=t, layer=layer,
                            after=self._slot_free_event())
        self.host_tier.load(tr)  # queued at once from host memory, or when its read lets it
        return tr

    def prefetch_host(self, key: int, t: int, layer: int) -> bool:
        """(tiered, `prefetch.into=host`) Read `key` into a host buffer unless it is in host memory or
        on its way; False if no host slot could be freed (skipped)."""
        return self.host_tier.prefetch_host(key, t, layer)

    def _slot_free_event(self):
        """CUDA: kernels already queued may still read the evicted expert in this buffer; the copy
        stream waits for them (an event recorded now on the compute stream). None on the CPU."""
        if not self.backend.cuda:
            return None
        import torch

        ev = torch.cuda.Event()
        ev.record()
        return ev

    def _on_done(self, tr: Transfer) -> None:
        """A copy ended (applied in `advance`, in completion order)."""
        moved = self.link.moved_of(tr)
        if self.host_tier is not None:
            self.host_tier.copy_done(tr, moved)
        self.ledger.applied(tr, moved)
        if tr in self.orphans:  # its staging buffer was freed while the copy ran: free now
            self.orphans.discard(tr)
            self._give(tr)

    @staticmethod
    def arrived(tr: Transfer, gate_s: float) -> bool:
        return tr.done and not tr.cancelled

    def cut_a_prefetch(self, pinned: set[int], chunk_bytes: float) -> None:
        """The one preemption rule (`sim.engine.preempt`); a copy's end estimated from the profile's link."""
        spec = self.spec
        lat_s, bw = spec.latency_s, spec.bandwidth_Bps
        chosen = choose_cut(self.link.running(), self.link.channels, pinned, self.now, chunk_bytes / bw, lat_s,
                            done_of=lambda x: x.start_s + lat_s + x.nbytes / bw)
        if chosen is not None:
            self.link.request_cancel(chosen[0])

    def wait(self, tr: Transfer) -> float:
        if tr.done:
            return 0.0
        w0 = time.perf_counter()
        self.link.wait(tr)
        return time.perf_counter() - w0

    def wait_ended(self, tr: Transfer) -> float:
        stall = self.wait(tr)
        self.settle()
        return stall

    def first_to_arrive(self, waiting: list[Transfer]) -> Transfer:
        return min(waiting, key=self.link.order_key)

    def _route(self, tr: Transfer):
        """(the store, the destination matrices) of a copy: a low-precision one into the low pool; in
        a tiered run, from its host buffer."""
        if self.host_tier is not None:
            return self.host_tier.source(tr), self.pool.matrices(tr.buf)
        if self._is_low(tr):
            return self.low.store, self.low.packed(tr.buf)
        return self.store, self.pool.matrices(tr.buf)

    def _is_low(self, tr: Transfer) -> bool:
        return self.low is not None and tr.staging and tr.nbytes == self.low.nbytes

    # ------------------------------------------------------------------ the CPU worker
    def cpu_start(self, keys: list[int], weights: list[float], ready_s: float, tokens: list[int] | None = None,
                  t: int = -1, layer: int = -1) -> None:
        """The CPU worker computes `keys` (each on one token, or on `tokens[i]` of a batch). Tiered:
        from their host buffers, once the reads of those not in host memory have ended (the job
        waits for all of them first, as the simulator's CPU worker does)."""
        k, store = self.k, self.store
        counts = tokens if tokens is not None else [1] * len(keys)
        if self.host_tier is None:
            self.cpu.submit([(key, lambda key=key, w=w, n=n: k.cpu_expert(store.host_matrices(key), w, n))
                             for key, w, n in zip(keys, weights, counts, strict=True)])
        else:
            tier = self.host_tier
            self._cpu_jobs = jobs = tier.cpu_reads(keys, t, layer)
            reads = [r for _, _, r in jobs if r is not None]

            def run(buf: int, w: float, n: int):
                for r in reads:
                    tier.wait_read(r)
                return k.cpu_expert(tier.pool.matrices(buf), w, n)

            self.cpu.submit([(key, lambda buf=buf, w=w, n=n: run(buf, w, n))
                             for (key, buf, _), w, n in zip(jobs, weights, counts, strict=True)])
        self._cpu_ready_s = ready_s

    def cpu_wait(self):
        w0 = self.now
        outs = self.cpu.wait()
        end = self.now
        if self._cpu_jobs is not None:  # (tiered) its experts' pins and bounce buffers go
            self.host_tier.cpu_done(self._cpu_jobs)
            self._cpu_jobs = None
        return end - w0, outs, self._cpu_ready_s, end

    # ------------------------------------------------------------------ memory
    def on_evicted(self, key: int) -> None:
        self.pool.give(self.buf_of.pop(key))

    def on_staging_freed(self, tr: Transfer) -> None:
        if tr.done:
            self._give(tr)
        else:
            self.orphans.add(tr)

    def _give(self, tr: Transfer) -> None:
        (self.low if self._is_low(tr) else self.pool).give(tr.buf)

    def on_adopted(self, tr: Transfer) -> None:
        self.buf_of[tr.key] = tr.buf


def _wait_until(t: float) -> None:
    """Block until `time.perf_counter()` reaches `t`: sleep to within a millisecond, then spin
    (a sleep alone may overshoot by the scheduler's tick)."""
    while True:
        left = t - time.perf_counter()
        if left <= 0.0:
            return
        if left > 2e-3:
            time.sleep(left - 1e-3)
