"""The simulator's event machine: the steps of `sim/engine/step.py` as SimPy processes and resources.

Actors (all in one `simpy.Environment`, time in seconds):
- the compute stream: a `simpy.Resource` of capacity 1; every compute op (attention, an expert or
  one of its GEMMs) holds it for its duration, a process of its own;
- the link: a `simpy.PriorityResource` with `channels`; every transfer is a process that holds a
  channel for its latency and body (demand loads are granted before queued prefetches, each
  priority in issue order), announces when its body starts and ends on a shared memory bus, and
  marks each of its three matrices as it arrives (for per-matrix pipelining);
- the memory bus (copies that share the device's memory bandwidth): a compute op's bytes are read
  at the bandwidth the copies in flight leave, re-rated at every copy start and end
  (`sim/machine/contention.py` states the model);
- the CPU worker: a `simpy.Resource` of capacity 1 that runs the experts placed on the CPU.
A step is a process: an operation returns a `Pending` whose event it yields. A prefetch cut
short for a demand load is interrupted and stops at its next chunk boundary.

With one issuer this machine and the fast one (`sim/engine/fast.py`) give the same timeline
(`tests/test_machines.py`, to 1e-9); this one is what new concurrent actors (several requests, a
batch scheduler, tiers of links) are added to. About 4-6x slower than the fast machine.
"""

from __future__ import annotations

import math

import simpy

from sim.engine.host import ABSENT as ABSENT_HOST
from sim.engine.host import READING as READING_HOST
from sim.engine.host import RESIDENT as RESIDENT_HOST
from sim.engine.link import CopyLink
from sim.engine.machine import SimulatedMachine
from sim.engine.preempt import choose_cut
from sim.engine.step import Pending
from sim.engine.tiers import TierLink
from sim.engine.transfer import DEMAND, PREFETCH, Transfer, arrived_by
from sim.machine.contention import FLOOR
from sim.machine.cost import CostModel, OpWork

SETTLE = 2  # scheduling priority below SimPy's NORMAL: runs after every event due at the same time


def at(env: simpy.Environment, t_s: float) -> simpy.Timeout:
    """A timeout that fires exactly at `t_s` (not one rounding step off, as `now + (t_s - now)` may
    be): the times a transfer reaches are the very floats the fast machine computes."""
    delay = max(0.0, t_s - env.now)
    while env.now + delay < t_s:
        delay = math.nextafter(delay, math.inf)
    while delay > 0.0 and env.now + delay > t_s:
        delay = math.nextafter(delay, 0.0)
    return env.timeout(delay)


class EventMachine(SimulatedMachine):

    def __init__(self, cost: CostModel, link: CopyLink | TierLink, pipelining: bool):
        self.env = env = simpy.Environment(initial_time=0.0)
        self.cost, self.pipelining = cost, pipelining
        self.tiers = tiers = link if isinstance(link, TierLink) else None  # a tiered run: its hops, host cache, logs
        self.spec = link if tiers is None else tiers.copy  # bandwidth, latency, channels, the counters `summarize` reads
        self.latency_s, self.bandwidth_Bps = link.latency_s, link.bandwidth_Bps
        self.channels = simpy.PriorityResource(env, capacity=link.channels)
        self.stream = simpy.Resource(env, capacity=1)
        self.cpu = simpy.Resource(env, capacity=1)
        self.shared = cost.shared_link
        self.copies = 0  # copy bodies in flight on the memory bus
        self.bus_changed = env.event()
        self.compute_busy_s = 0.0
        self.ledger = None
        self._seq = 0
        self._running: dict[int, tuple[Transfer, simpy.Process]] = {}  # seqno -> on a channel
        self._done: dict[int, simpy.Event] = {}  # seqno -> fires when the transfer has ended
        self._matrix: dict[int, list[simpy.Event]] = {}  # seqno -> its three matrices' arrivals
        self._started: dict[int, simpy.Event] = {}  # seqno -> fires when it is on a channel
        self._cpu_job = None
        self._cpu_keys: list[int] = []
        self._end: float | None = None
        if tiers is not None:  # the storage hop: a resource of its own; a process per read
            self.read_channels = simpy.PriorityResource(env, capacity=tiers.read.channels)
            self._read_started: dict[int, simpy.Event] = {}  # read seqno -> fires when it is on a channel
            self._read_done: dict[int, simpy.Event] = {}  # read seqno -> fires when it has ended

    def attach(self, ledger) -> None:
        self.ledger = ledger

    @property
    def now(self) -> float:
        """The simulated time; once the replay has ended, the time it ended (the compute stream's
        end, as the fast machine's clock), though copies still in flight run on."""
        return self.env.now if self._end is None else self._end

    def run(self, process) -> None:
        """Run the replay (a generator of events) to its end, and every copy still in flight."""
        proc = self.env.process(process)
        proc.callbacks.append(lambda _: setattr(self, "_end", self.env.now))
        self.env.run()

    def finish(self) -> None:
        self.env.run()

    # ------------------------------------------------------------------ the memory bus
    def _bus(self, delta: int) -> None:
        self.copies += delta
        ev, self.bus_changed = self.bus_changed, self.env.event()
        ev.succeed()

    def _op(self, work: OpWork):
        """One compute op on the stream: its overhead, then its bytes at the bandwidth left."""
        env = self.env
        with self.stream.request() as req:
            yield req
            t0 = env.now
            if not self.shared:
                yield env.timeout(work.overhead_s + max(work.nbytes / self.cost.device.memory_bandwidth_Bps,
                                                         work.matmul_s))
            else:
                yield env.timeout(work.overhead_s)
                min_end = env.now + work.matmul_s
                B = self.cost.device.memory_bandwidth_Bps
                left = work.nbytes
                while left > 0.0:
                    rate = max(B - self.copies * self.bandwidth_Bps, FLOOR * B)
                    t1, eta = env.now, env.timeout(left / rate)
                    yield eta | self.bus_changed
                    if eta.processed:
                        break
                    left -= (env.now - t1) * rate
                if env.now < min_end:
                    yield env.timeout(min_end - env.now)
            self.compute_busy_s += env.now - t0

    def _compute(self, work: OpWork) -> Pending:
        return Pending(self.env.process(self._op(work)))

    def attention(self, layer: int, context: int, new_tokens: int) -> Pending:
        return self._compute(self.cost.attention_work(context, new_tokens))

    def attention_batch(self, layer: int, pairs: list[tuple[int, int]]) -> Pending:
        return self._compute(self.cost.batch_attention_work(pairs))

    def run_op(self, work: OpWork) -> Pending:
        return self._compute(work)

    def idle_until(self, t_s: float) -> Pending:
        return Pending(self.env.timeout(max(0.0, t_s - self.env.now)))

    def compute(self, key: int, tokens: int, weight: float) -> Pending:
        return self._compute(self.cost.expert_work(tokens))

    # ------------------------------------------------------------------ the link
    def settle(self) -> Pending:
        """Let every event due now run first (completions, grants): the state as of now."""
        ev = simpy.Event(self.env)
        ev._ok, ev._value = True, None
        self.env.schedule(ev, SETTLE)
        return Pending(ev)

    def link_full(self) -> bool:
        return self.channels.count >= self.channels.capacity

    def issue(self, key: int, nbytes: float, priority: int, staging: bool, t: int, layer: int) -> Transfer:
        env = self.env
        self._seq += 1
        tr = Transfer(key, nbytes, priority, staging, t, layer, env.now, self._seq)
        if self.tiers is not None:
            return self._issue_tiered(tr)
        req = self.channels.request(priority=priority)  # granted at once if a channel is free
        if req.triggered:  # on a channel from now on, as the fast link starts it at once
            self._begin(tr)
        self._done[tr.seqno] = env.event()
        self._started[tr.seqno] = env.event()
        self._matrix[tr.seqno] = [env.event() for _ in range(3)]
        proc = env.process(self._transfer(tr, req))
        self._running[tr.seqno] = (tr, proc)
        return tr

    def _issue_tiered(self, tr: Transfer) -> Transfer:
        """A device copy in a tiered run (`sim.engine.tiers`): at once from host memory, or after the
        expert's storage read (the one in flight, or a new one at the copy's priority)."""
        env, host = self.env, self.tiers.host
        where = host.lookup(tr.key, tr.token)
        host.pin(tr.key)
        self._done[tr.seqno] = env.event()
        self._started[tr.seqno] = env.event()
        self._matrix[tr.seqno] = [env.event() for _ in range(3)]
        if where == RESIDENT_HOST:
            req = self.channels.request(priority=tr.priority)
            if req.triggered:
                self._begin(tr)
            proc = env.process(self._transfer(tr, req))
        else:
            r = host.reading[tr.key] if where == READING_HOST else self._issue_read(tr.key, tr.priority, tr.token,
                                                                                   tr.layer, False)
            tr.source = r
            proc = env.process(self._follow(tr, r))
        self._running[tr.seqno] = (tr, proc)
        return tr

    def _follow(self, tr: Transfer, r: Transfer):
        """A copy that follows read `r`: queued once the read ends (whole) or once its first chunk is
        in (pipelined: and it ends no earlier than a chunk's copy after the read's end)."""
        env, tiers = self.env, self.tiers
        if tiers.pipelined:
            if r.start_s < 0.0:
                yield self._read_started[r.seqno]
            first = r.start_s + tiers.read.latency_s + tiers.chunk_bytes / tiers.read.bandwidth_Bps
            tr.min_done_s = r.done_s + tiers.chunk_bytes / tiers.copy.bandwidth_Bps
            if first > env.now:
                yield at(env, first)
        elif not r.done:
            yield self._read_done[r.seqno]
        req = self.channels.request(priority=tr.priority)
        if req.triggered:
            self._begin(tr)
        yield from self._transfer(tr, req)

    def _issue_read(self, key: int, priority: int, t: int, layer: int, prefetch: bool) -> Transfer | None:
        """A storage read of `key` into host memory (a slot, or a bounce buffer); None: a prefetch found no slot."""
        env = self.env
        r = self.tiers.new_read(key, priority, t, layer, env.now, prefetch)
        if r is None:
            return None
        req = self.read_channels.request(priority=priority)
        if req.triggered:
            self._begin_read(r)
        self._read_started[r.seqno] = env.event()
        self._read_done[r.seqno] = env.event()
        env.process(self._reading(r, req))
        return r

    def _begin_read(self, r: Transfer) -> None:
        hop = self.tiers.read
        r.start_s = self.env.now
        r.done_s = r.start_s + (hop.latency_s + r.nbytes / hop.bandwidth_Bps)  # as the fast link computes it
        hop.max_active = max(hop.max_active, self.read_channels.count)

    def _reading(self, r: Transfer, req):
        env, tiers = self.env, self.tiers
        try:
            yield req
            if r.start_s < 0.0:
                self._begin_read(r)
            self._read_started.pop(r.seqno).succeed()
            yield at(env, r.done_s)
        finally:
            self.read_channels.release(req)
        tiers.read.busy_s += r.done_s - r.start_s
        tiers.read.bytes_moved += r.nbytes
        r.done = True
        tiers.host.read_done(r)
        tiers.reads.finish(r, r.nbytes)
        self._read_done.pop(r.seqno).succeed(r)

    def prefetch_host(self, key: int, t: int, layer: int) -> bool:
        """(tiered, `prefetch.into=host`) `FastMachine.prefetch_host`."""
        tiers = self.tiers
        if tiers.host.state(key) != ABSENT_HOST:
            return True
        return tiers.count_host_prefetch(self._issue_read(key, PREFETCH, t, layer, True))

    def _transfer(self, tr: Transfer, req):
        env, spec = self.env, self.spec
        cut_at = None
        try:
            yield req
            if tr.start_s < 0.0:  # it waited in the queue
                self._begin(tr)
            self._started.pop(tr.seqno).succeed()
            first = tr.start_s + self.latency_s
            per_matrix = (tr.done_s - first) / 3.0
            try:
                yield at(env, first)
                if self.shared:
                    self._bus(+1)
                for i in range(1, 4):  # the matrices arrive in order (the times the fast machine computes)
                    yield at(env, first + i * per_matrix)
                    self._matrix[tr.seqno][i - 1].succeed()
                if env.now < tr.done_s:  # (it ends with its last matrix: the channel is free at that very event)
                    yield at(env, tr.done_s)
                if self.shared:
                    self._bus(-1)
            except simpy.Interrupt as cut:  # cut short at a chunk boundary for a demand load
                cut_at = cut.cause
                in_body = env.now >= first
                if cut_at > env.now:
                    if not in_body and cut_at >= first:
                        yield at(env, first)
                        if self.shared:
                            self._bus(+1)
                        in_body = True
                    yield at(env, cut_at)
                if in_body and self.shared:
                    self._bus(-1)
        finally:
            self.channels.release(req)
        spec.busy_s += env.now - tr.start_s
        moved = tr.nbytes if cut_at is None else max(0.0, (env.now - tr.start_s - self.latency_s) * self.bandwidth_Bps)
        spec.bytes_moved += moved
        tr.done = True
        del self._running[tr.seqno]
        if self.tiers is not None:
            self.tiers.host.unpin(tr.key)
        self.ledger.applied(tr, moved)
        self._done.pop(tr.seqno).succeed(tr)
        del self._matrix[tr.seqno]

    def _begin(self, tr: Transfer) -> None:
        tr.start_s = self.env.now
        tr.done_s = tr.start_s + (self.latency_s + tr.nbytes / self.bandwidth_Bps)  # as the fast link computes it
        if tr.done_s < tr.min_done_s:  # (tiered, pipelined: not before its read's last chunk is copied)
            tr.done_s = tr.min_done_s
        self.spec.max_active = max(self.spec.max_active, self.channels.count)

    arrived = staticmethod(arrived_by)  # the same instant as the fast machine's, even before its end event ran

    def cut_a_prefetch(self, pinned: set[int], chunk_bytes: float) -> None:
        """The one rule (`sim.engine.preempt`), as the fast machine: interrupt the chosen transfer's process."""
        busy = [tr for tr, _ in self._running.values() if tr.start_s >= 0.0 and not tr.done]
        chosen = choose_cut(busy, self.channels.capacity, pinned, self.env.now, chunk_bytes / self.bandwidth_Bps,
                            self.latency_s)
        if chosen is not None:
            best, cut = chosen
            best.cancelled, best.done_s = True, cut  # at once, as the fast link marks it
            self._running[best.seqno][1].interrupt(cut)

    def wait(self, tr: Transfer) -> Pending:
        """Wait for `tr` to end (AdapMoE's wait); its value is the stall."""
        return Pending(self.env.process(self._wait(tr)))

    def _wait(self, tr: Transfer):
        t0 = self.env.now
        if not tr.done:
            yield self._done[tr.seqno]
        return self.env.now - t0

    def wait_ended(self, tr: Transfer) -> Pending:
        return self.wait(tr)

    def first_to_arrive(self, waiting: list[Transfer]) -> Pending:
        return Pending(self.env.process(self._first(waiting)))

    def _first(self, waiting: list[Transfer]):
        """The one that ends first, as the fast machine orders them (by end time; ties in list
        order), decided as soon as it can be: a transfer's end is known once it is on a channel,
        and one still queued cannot end before a channel frees plus its own duration (a tiered copy
        that follows a read may also start on a channel that is free now, once its read lets it)."""
        while True:
            queued = [tr for tr in waiting if tr.start_s < 0.0]
            started = [tr for tr in waiting if tr.start_s >= 0.0]
            if not queued:
                return min(waiting, key=lambda tr: tr.done_s)
            on_channel = [x.done_s for x, _ in self._running.values() if x.start_s >= 0.0 and not x.done]
            chained = any(q.source is not None for q in queued)  # (tiered: may start on a channel free now)
            if started and on_channel and not chained:  # (none on a channel: a granted one is about to start)
                best = min(started, key=lambda tr: tr.done_s)
                free = min(on_channel)
                if all(best.done_s < free + self.latency_s + q.nbytes / self.bandwidth_Bps for q in queued):
                    return best
            events = [self._started[tr.seqno] for tr in queued]
            if started and chained:  # (tiered) a copy that follows a read may start on a channel free now:
                best = min(started, key=lambda tr: tr.done_s)  # decided once none can end before `best`
                if self.env.now >= best.done_s or all(best.done_s < self._earliest_end(q) for q in queued):
                    return best
                events.append(at(self.env, best.done_s))
            yield self.env.any_of(events)

    def _earliest_end(self, q: Transfer) -> float:
        """A lower bound on when queued copy `q` can end: it starts no earlier than now, than a copy
        channel frees when all are busy, and (a tiered copy that follows a read) than its read lets
        it (a queued read starts no earlier than a read channel frees); pipelined, it ends no
        earlier than a chunk's copy after its read's end."""
        now = self.env.now
        body = self.latency_s + q.nbytes / self.bandwidth_Bps
        start = now
        if self.channels.count >= self.channels.capacity:
            start = min((x.done_s for x, _ in self._running.values() if x.start_s >= 0.0 and not x.done), default=now)
        r, tiers = q.source, self.tiers
        if r is None or r.done:
            return start + body
        hop = tiers.read
        first_s = tiers.chunk_bytes / hop.bandwidth_Bps if tiers.pipelined else r.nbytes / hop.bandwidth_Bps
        if r.start_s >= 0.0:
            read_start = r.start_s
        elif self.read_channels.count >= self.read_channels.capacity:
            read_start = min((x.done_s for x in self.tiers.host.reading.values() if x.start_s >= 0.0 and not x.done),
                             default=now)
        else:
            read_start = now
        release = read_start + hop.latency_s + first_s
        end = max(start, release) + body
        if tiers.pipelined:
            end = max(end, read_start + hop.latency_s + r.nbytes / hop.bandwidth_Bps
                      + tiers.chunk_bytes / tiers.copy.bandwidth_Bps)
        return end

    def compute_loaded(self, tr: Transfer, tokens: int, weight: float) -> Pending:
        return Pending(self.env.process(self._compute_loaded(tr, tokens)))

    def _compute_loaded(self, tr: Transfer, tokens: int):
        env = self.env
        t0, stall = env.now, 0.0
        if self.pipelining:
            third = self.cost.expert_work(tokens, 1.0 / 3.0)
            for i in range(3):
                ev = self._matrix.get(tr.seqno)
                if ev is not None and not ev[i].processed:
                    w0 = env.now
                    yield ev[i]
                    stall += env.now - w0
                yield env.process(self._op(third))
        else:
            if not tr.done:
                yield self._done[tr.seqno]
            stall = env.now - t0
            yield env.process(self._op(self.cost.expert_work(tokens)))
        return None, stall

    # ------------------------------------------------------------------ the CPU worker
    def cpu_start(self, keys: list[int], weights: list[float], ready_s: float, tokens: list[int] | None = None,
                  t: int = -1, layer: int = -1) -> None:
        reads = []
        if self.tiers is not None:  # the experts not in host memory are read first (`tiers_cpu_reads`)
            host = self.tiers.host
            for key in keys:
                where = host.lookup(key, t)
                host.pin(key)
                if where == READING_HOST:
                    reads.append(host.reading[key])
                elif where != RESIDENT_HOST:
                    r = self._issue_read(key, DEMAND, t, layer, False)
                    reads.append(r)
            self._cpu_keys = keys
        self._cpu_job = self.env.process(self._cpu(self.cost.cpu_experts_s(len(keys), tokens), reads))

    def _cpu(self, duration_s: float, reads=()):
        for r in reads:
            if not r.done:
                yield self._read_done[r.seqno]
        with self.cpu.request() as req:
            yield req
            start = self.env.now
            yield self.env.timeout(duration_s)
            return start, self.env.now

    def cpu_wait(self) -> Pending:
        return Pending(self.env.process(self._cpu_wait(self._cpu_job)))

    def _cpu_wait(self, job):
        t0 = self.env.now
        start, end = yield job
        if self.tiers is not None:
            for key in self._cpu_keys:
                self.tiers.host.unpin(key)
            self._cpu_keys = []
        return max(0.0, self.env.now - t0), None, start, end


__all__ = ["EventMachine", "DEMAND"]
