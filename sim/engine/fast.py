"""The simulator's fast machine: one issuer, every time computed when it is needed, no events.

It executes `sim/engine/step.py` for a single issuing compute stream (batch-1 replay): the compute
stream's clock (`now`) advances by each op's modelled duration at once; the link (`CopyLink`)
schedules its transfers itself and applies their completions lazily, in time order, whenever the
stream looks at it and whenever an op moves its clock past them (`settle` after every op: as the event
machine applies each at its time, so a batched step that reads the cache between two computes
sees what the event machine sees); on a link that shares the device's memory bandwidth, each op's duration comes
from the copies in flight beside it (`sim.machine.contention.MemoryBus`); the CPU worker is a
second clock. With one issuer, every time is known when it is needed, so no SimPy event is needed
and no step ever yields. `sim/engine/events.py` executes the same steps with SimPy actors (a
process per transfer, the compute stream and the CPU worker as resources); `tests/test_machines.py`
checks the two give the same timeline to 1e-9 on random configurations (every preset, 1-3
channels, shared and separate memory, pipelining, prefill). `run` and `sweep` use this machine.
"""

from __future__ import annotations

from operator import attrgetter

from policies.base import CPU, LOAD
from sim.engine.cache import ABSENT, RESIDENT
from sim.engine.host import ABSENT as ABSENT_HOST
from sim.engine.host import RESIDENT as RESIDENT_HOST
from sim.engine.link import CopyLink
from sim.engine.machine import SimulatedMachine
from sim.engine.preempt import choose_cut
from sim.engine.tiers import TierLink
from sim.engine.transfer import DEMAND, PREFETCH, SAME_INSTANT, Transfer, arrived_by
from sim.machine.contention import MemoryBus
from sim.machine.cost import CostModel


class FastMachine(SimulatedMachine):

    def __init__(self, cost: CostModel, link: CopyLink, pipelining: bool):
        self.cost, self.link, self.pipelining = cost, link, pipelining
        self.now = 0.0  # the compute stream's clock (s)
        self.cpu_t = 0.0  # the CPU worker's clock (s)
        self.compute_busy_s = 0.0
        self.bus = MemoryBus(cost.device.memory_bandwidth_Bps, cost.link_bandwidth_Bps, link) if cost.shared_link else None
        self.expert_work = cost.expert_work()
        self.expert_s = cost.expert_s
        self._expert_tokens_s: dict[int, float] = {}
        self._cpu_span = (0.0, 0.0)
        self._cpu_job = None  # (tiered) the CPU job's (keys, tokens, ready_s, reads), timed at `cpu_wait`
        self.ledger = None  # set by the engine; the link reports completions to it
        self.tiers = link if isinstance(link, TierLink) else None  # a tiered run: `link` is both hops
        #: a batched step may run `sim.engine.fast_batch.fast_batch_layer` (its common case, written out)
        self.inline_batch = not pipelining and self.bus is None and self.tiers is None

    def attach(self, ledger) -> None:
        self.ledger = ledger
        self.link.on_done = ledger.applied

    # ------------------------------------------------------------------ the link
    def settle(self) -> None:
        """Apply the completions up to now (they free slots and make experts resident). Called after
        every op that moves the clock, as the event machine applies each completion at its time,
        before the step that waited resumes (one at the very instant included): whatever the step
        or its driver reads next (the cache between two computes, a resize's victims) is as of now."""
        heap = self.link.running_heap
        if heap and heap[0][0] <= self.now:
            self.link.advance(self.now)

    def token_done(self) -> float:
        """When the token's (or step's) work ended: now, with what ended by then applied."""
        self.settle()
        return self.now

    def link_full(self) -> bool:
        """Every channel busy, as of now (`settle`, inline: this is on every load's path)."""
        link = self.link
        heap = link.running_heap
        if heap and heap[0][0] <= self.now:
            link.advance(self.now)
        if self.tiers is not None:  # (its heap holds both hops' events)
            return link.busy_channels() >= link.channels
        return len(heap) >= link.channels

    def issue(self, key: int, nbytes: float, priority: int, staging: bool, t: int, layer: int) -> Transfer:
        return self.link.submit(key, nbytes, priority, self.now, staging, t, layer)

    arrived = staticmethod(arrived_by)

    def cut_a_prefetch(self, pinned: set[int], chunk_bytes: float) -> None:
        """No channel free for a demand load: cut a prefetch by the one rule (`sim.engine.preempt`)."""
        link = self.link
        chosen = choose_cut(link.running(), link.channels, pinned, self.now, chunk_bytes / link.bandwidth_Bps,
                            link.latency_s)
        if chosen is not None:
            link.preempt(chosen[0], self.now, chunk_bytes)

    # ------------------------------------------------------------------ the compute stream
    def attention(self, layer: int, context: int, new_tokens: int) -> None:
        a0, cost = self.now, self.cost
        if self.bus is not None:
            d = cost.attention_work(context, new_tokens).shared_s(a0, self.bus)
        elif new_tokens == 1:
            d = cost.attention_decode_s(context)
        else:
            d = cost.attention_s(context, new_tokens)
        self.now = a0 + d
        self.compute_busy_s += d
        self.settle()

    def attention_batch(self, layer: int, pairs: list[tuple[int, int]]) -> None:
        """A batch's non-expert work: each request's (context, new tokens) (`CostModel.batch_attention_work`)."""
        self.run_op(self.cost.batch_attention_work(pairs))

    def run_op(self, work) -> None:
        """An op on the compute stream (a `sim.machine.cost.OpWork`: a batch's attention, a draft model)."""
        if self.bus is not None:
            d = self.bus.op_s(work, self.now)
        else:
            d = work.overhead_s + max(work.nbytes / self.cost.device.memory_bandwidth_Bps, work.matmul_s)
        self.now += d
        self.compute_busy_s += d
        self.settle()

    def idle_until(self, t_s: float) -> None:
        """Nothing to run until `t_s` (the next request's arrival): the compute stream waits."""
        if t_s > self.now:
            self.now = t_s
        self.settle()

    def _expert_s(self, start_s: float, tokens: int, fraction: float = 1.0) -> float:
        if self.bus is not None:
            work = self.expert_work if tokens == 1 and fraction == 1.0 else self.cost.expert_work(tokens, fraction)
            return work.shared_s(start_s, self.bus)
        assert fraction == 1.0, "a fraction of an expert is only timed on a shared link"
        if tokens == 1:
            return self.expert_s
        d = self._expert_tokens_s.get(tokens)
        if d is None:  # an expert on a batch's tokens: memoised by their count
            d = self._expert_tokens_s[tokens] = self.cost.expert_compute_s(tokens)
        return d

    def compute(self, key: int, tokens: int, weight: float) -> None:
        d = self.expert_s if tokens == 1 and self.bus is None else self._expert_s(self.now, tokens)
        self.now += d
        self.compute_busy_s += d
        self.settle()

    def wait(self, tr: Transfer) -> float:
        """Wait for `tr` to end (AdapMoE's wait for a prefetch); returns the stall."""
        self.link.wait_started(tr)
        stall = 0.0
        if tr.done_s > self.now:
            stall = tr.done_s - self.now
            self.now = tr.done_s
        self.settle()
        return stall

    def wait_ended(self, tr: Transfer) -> float:
        """Wait until a cut transfer has stopped (and been applied); returns the stall."""
        return self.wait(tr)

    def first_to_arrive(self, waiting: list[Transfer]) -> Transfer:
        if len(waiting) == 1:  # (a batched step waits for its loads in issue order)
            tr = waiting[0]
            if tr.start_s < 0.0:
                self.link.wait_started(tr)
            return tr
        for tr in waiting:
            if tr.start_s < 0.0:  # queued: look ahead until it is on a channel
                self.link.wait_started(tr)
        return min(waiting, key=_done_s)

    def compute_loaded(self, tr: Transfer, tokens: int, weight: float) -> tuple[None, float]:
        """Compute an expert whose transfer has started; returns (no output, the stall it caused).

        Without pipelining the expert starts when its transfer is done; with it, each of its three
        GEMMs starts when its matrix is in and the previous GEMM is done."""
        first_s = tr.start_s + self.cost.link_latency_s  # the first byte is in
        stall = busy = 0.0
        if self.pipelining:
            per_matrix_s = (tr.done_s - first_s) / 3.0
            t = self.now
            whole = None if self.bus is not None else self._expert_s(t, tokens)  # each GEMM a third of it
            for i in range(1, 4):
                arrive = first_s + i * per_matrix_s
                if arrive > t:
                    stall += arrive - t
                    t = arrive
                gemm = whole / 3.0 if whole is not None else self._expert_s(t, tokens, 1.0 / 3.0)
                t += gemm
                busy += gemm
            if whole is not None:
                busy = whole
            self.now = t
        else:
            if tr.done_s > self.now:
                stall = tr.done_s - self.now
                self.now = tr.done_s
            busy = self._expert_s(self.now, tokens)
            self.now += busy
        self.compute_busy_s += busy
        self.settle()
        return None, stall

    # ------------------------------------------------------------------ the CPU worker
    def cpu_start(self, keys: list[int], weights: list[float], ready_s: float, tokens: list[int] | None = None,
                  t: int = -1, layer: int = -1) -> None:
        """The CPU worker computes `keys` (each on one token, or on `tokens[i]` of a batch). Tiered: the
        experts not in host memory are read first (demand reads); the job is timed at `cpu_wait`, once
        the reads' times are known."""
        tiers = self.tiers
        if tiers is not None:
            self._cpu_job = (keys, tokens, ready_s, tiers_cpu_reads(tiers, keys, self.now, t, layer))
            return
        start = max(self.cpu_t, ready_s)
        self.cpu_t = start + self.cost.cpu_experts_s(len(keys), tokens)
        self._cpu_span = (start, self.cpu_t)

    def cpu_wait(self) -> tuple[float, None, float, float]:
        """(the compute stream's wait for the CPU, no outputs, the CPU's start and end)."""
        if self._cpu_job is not None:  # tiered: the job starts once its reads are in
            keys, tokens, ready_s, reads = self._cpu_job
            self._cpu_job = None
            for r in reads:
                self.link.wait_started(r)
            start = max([self.cpu_t, ready_s] + [r.done_s for r in reads])
            self.cpu_t = start + self.cost.cpu_experts_s(len(keys), tokens)
            self._cpu_span = (start, self.cpu_t)
            for key in keys:
                self.tiers.host.unpin(key)
        start, end = self._cpu_span
        wait = 0.0
        if end > self.now:
            wait = end - self.now
            self.now = end
        self.settle()
        return wait, None, start, end


    def prefetch_host(self, key: int, t: int, layer: int) -> bool:
        """(tiered, `prefetch.into=host`) Read `key` into host memory unless it is there or on its way;
        False if no host slot could be freed (the prefetch is skipped)."""
        tiers = self.tiers
        if tiers.host.state(key) != ABSENT_HOST:
            return True
        return tiers.read_to_host(key, PREFETCH, self.now, t, layer) is not None

    def finish(self) -> None:
        """Apply every completion still ahead."""
        self.link.advance(float("inf"))


def tiers_cpu_reads(tiers: TierLink, keys: list[int], now_s: float, t: int, layer: int) -> list[Transfer]:
    """(tiered) A CPU job on `keys` at `now_s`: each is looked up in host memory and pinned there
    until the job ends; the reads (in flight, or issued now at demand priority) of those not in it."""
    host, reads = tiers.host, []
    for key in keys:
        where = host.lookup(key, t)
        host.pin(key)
        if where != RESIDENT_HOST:
            r = tiers.read_to_host(key, DEMAND, now_s, t, layer)
            if r is not None:
                reads.append(r)
    return reads


_done_s = attrgetter("done_s")  # a transfer's end (a sort key)


def decode_token(e, t: int, rec_ops: bool) -> None:
    """A whole decode token on the fast machine: the steps of `sim/engine/step.py`'s `decode_layer`
    for every layer, with the compute stream's clock in a local and the common cases written inline.

    The simulator's hot path (`python -m sim bench` measures it). It must stay the same as
    `decode_layer` run by the SimPy machine: `tests/test_machines.py` checks their timelines and
    counters agree on random configurations of every preset. Loads are issued by the shared
    `step.load`, and everything a load changes is booked by the shared `Ledger`; what is written
    here again is only the order of the step and its arithmetic on time."""
    from sim.engine.step import load

    m, ledger, rec = e.machine, e.ledger, e.rec
    cache, E, link, cost = ledger.cache, ledger.E, m.link, m.cost
    state, inflight, unused, pinned = cache.state, ledger.inflight, ledger.unused, cache.pinned
    heap, advance = link.running_heap, link.advance
    bus = m.bus
    pl_ = rec.per_layer
    p_used, p_late, p_stall, p_demand, p_hits = (pl_[k] for k in ("prefetch_used", "prefetch_late", "stall_s",
                                                                  "demand_loads", "hits"))
    placement, prefetch = e.placement, e.prefetch
    always_load, place = placement.always_load, placement.place
    on_layer, on_access = prefetch.on_layer, e.cache_policy.on_access
    on_step = e.cache_policy.on_step if e.cache_policy.observes_steps else None  # (bound once: one check a layer)
    step_rows = [t]  # the rows of each of its layers' steps (`CachePolicy.on_step`, read-only)
    wait_prefetch, stop_on_skip = prefetch.wait_for_prefetch, prefetch.stop_at_first_skip
    tiers = m.tiers  # a tiered run: stalls are split by hop, prefetches may go into host memory
    into_host = e.prefetch_into_host
    prefetch_staging, by_target, released = ledger.prefetch_staging, ledger.by_target, ledger.released
    expert_s, expert_work = m.expert_s, m.expert_work
    bus_op_s = bus.op_s if bus is not None else None
    simple_compute = not m.pipelining
    trace = e.ctx.trace
    pos = int(trace.pos[t])
    attn_s = cost.attention_decode_s(pos)  # without contention
    attn_work = cost.attention_work(pos) if bus is not None else None
    plan = e.plan is not None
    if plan:
        keys_t, w_t, dL_t, n_t = e._keys[t].tolist(), e._w[t].tolist(), e._dL[t].tolist(), e._n[t].tolist()
        top_k = e._keys.shape[2]
    count_here = e.count_here
    demand = hits = needed = single = 0
    dL_tok = stall_tok = cpu_wait = busy = 0.0
    start = now = m.now
    for layer in range(e.L):
        # 1. attention; what has arrived by now
        a0 = now
        now += bus_op_s(attn_work, a0) if bus is not None else attn_s
        busy += now - a0
        if rec_ops:
            rec.op("compute", t, layer, "attention", a0, now)
        m.now = gate_s = now
        if heap and heap[0][0] <= gate_s:
            advance(gate_s)
        # 2. gating
        if plan:
            k = n_t[layer]
            keys, ws, dL = keys_t[layer], w_t[layer], dL_t[layer]
            if k < top_k:  # dropped experts (-1) come last
                keys, ws = keys[:k], ws[:k]
        else:
            keys, ws, dL = e.decide(t, layer)
        pinned.update(keys)
        if on_step is not None:  # the cache policy is told the step's row, before its loads
            on_step(step_rows, layer)
        # 3. where each active expert is
        ready: list[int] = []
        waiting: list[Transfer] = []
        cpu_keys = None
        layer_hits = 0
        for j, key in enumerate(keys):
            tr = inflight.get(key)
            if tr is not None and tr.cancelled:  # a prefetch cut for a demand load, still stopping
                m.now = now
                s = m.wait_ended(tr)
                now = m.now
                stall_tok += s
                p_stall[layer] += s
                tr = inflight.get(key)
            if tr is None:
                if state[key] == RESIDENT:
                    ready.append(key)
                    layer_hits += 1
                    if key in unused:
                        unused.discard(key)
                        p_used[layer] += 1
                    continue
                if always_load or (where := place(key, t, ws[j])) == LOAD:
                    waiting.append(load(e, key, DEMAND, t, layer))
                elif where == CPU:
                    if cpu_keys is None:
                        cpu_keys = []
                    cpu_keys.append(key)
                    continue
                else:  # LOW: a low-precision copy into a staging buffer, lossy
                    waiting.append(load(e, key, DEMAND, t, layer, placement.low_bytes, True))
                    dL += placement.dL(layer, ws[j])
                demand += 1
                p_demand[layer] += 1
                continue
            if 0.0 <= tr.start_s and tr.done_s <= gate_s * (1.0 + SAME_INSTANT):  # arrived (`arrived_by`): a hit
                layer_hits += 1
                if tr.staging:
                    waiting.append(tr)
                else:
                    ready.append(key)
            else:
                waiting.append(tr)
                if key in unused:
                    p_late[layer] += 1
            if key in unused:
                unused.discard(key)
                p_used[layer] += 1
        if cpu_keys:
            m.cpu_start(cpu_keys, [], gate_s, None, t, layer)
            pl_["cpu_experts"][layer] += len(cpu_keys)
        # 4. prefetches for later layers
        for pk in on_layer(t, layer):
            if state[pk] == ABSENT and pk not in inflight:
                if into_host:
                    if not m.prefetch_host(pk, t, layer) and stop_on_skip:
                        break
                elif load(e, pk, PREFETCH, t, layer, None, prefetch_staging) is None and stop_on_skip:
                    break
        # 5. AdapMoE's wait for the prefetches aimed at this layer
        pending = by_target.pop(layer, None) if by_target else None
        if pending and wait_prefetch:
            for tr in pending:
                link.wait_started(tr)
                if tr.done_s > now:
                    stall_tok += tr.done_s - now
                    p_stall[layer] += tr.done_s - now
                    if tiers is not None:
                        tiers.storage_stall(tr, now, tr.done_s - now)
                    now = tr.done_s
        # 6. compute: resident first, then loads in arrival order, then the CPU's
        for key in ready:
            c0 = now
            now += bus_op_s(expert_work, c0) if bus is not None else expert_s
            busy += now - c0
            on_access(key, t)
            if rec_ops:
                rec.op("compute", t, layer, f"expert {key % E}", c0, now)
        if waiting:
            for tr in waiting:
                if tr.start_s < 0.0:  # queued: look ahead until it is on a channel
                    link.wait_started(tr)
            if len(waiting) > 1:
                waiting.sort(key=_done_s)
            for tr in waiting:
                if simple_compute and not rec_ops:  # `FastMachine.compute_loaded`, inline
                    if tr.done_s > now:
                        s = tr.done_s - now
                        if tiers is not None:
                            tiers.storage_stall(tr, now, s)
                        now = tr.done_s
                    else:
                        s = 0.0
                    dur = bus_op_s(expert_work, now) if bus is not None else expert_s
                    now += dur
                    busy += dur
                else:
                    c0 = m.now = now
                    s = m.compute_loaded(tr, 1, 1.0)[1]
                    if s and tiers is not None:
                        tiers.storage_stall(tr, c0, s)
                    now = m.now
                    if rec_ops:
                        rec.op("compute", t, layer, f"expert {tr.key % E}", c0 + s, now)
                stall_tok += s
                p_stall[layer] += s
                if tr.staging:  # (what ended by now applied first, as `FastMachine.settle`)
                    m.now = now
                    if heap and heap[0][0] <= now:
                        advance(now)
                    released(tr, t, layer)
                else:  # `Ledger.released` of a cache load, inline
                    on_access(tr.key, t)
        m.now = now
        if heap and heap[0][0] <= now:  # what ended by now applied (`FastMachine.settle`)
            advance(now)
        if cpu_keys:
            wait_s, _, c_start, c_end = m.cpu_wait()
            cpu_wait += wait_s
            now = m.now
            if rec_ops:
                rec.op("cpu", t, layer, f"{len(cpu_keys)} expert(s)", c_start, c_end)
        # 7. wrong staged prefetches dropped; counters
        if pending and prefetch_staging:
            ledger.drop_unused_staged(pending, layer)
        pinned.clear()
        hits += layer_hits
        p_hits[layer] += layer_hits
        if count_here:
            n = len(keys)
            needed += n
            single += n == 1
            dL_tok += dL
            pl_["needed"][layer] += n
            pl_["experts_run"][layer] += n
            pl_["single_pairs"][layer] += n == 1
            pl_["dL"][layer] += dL
    m.now = now
    m.compute_busy_s += busy
    e.decoded.append(t)
    row = rec.tokens
    row["seq"].append(int(trace.seq[t]))
    row["pos"].append(pos)
    row["start_s"].append(start)
    row["end_s"].append(now)
    e.t_end = now
    row["stall_s"].append(stall_tok)
    row["cpu_wait_s"].append(cpu_wait)
    row["demand_loads"].append(demand)
    row["hits"].append(hits)
    if count_here:
        row["needed"].append(needed)
        row["experts_run"].append(needed)
        row["single_pairs"].append(single)
        row["dL"].append(dL_tok)
