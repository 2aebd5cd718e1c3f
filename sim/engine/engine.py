"""The engine: replays a trace's routing against a hardware profile under policies (DESIGN 4).

Resources: the device compute stream (`self.t`, its clock), the expert link (`sim.engine.link.CopyLink`, a
priority resource with `channels`), the CPU compute stream (`self.cpu_t`, for experts placed on
the CPU) and the expert cache (`sim.engine.cache.ExpertCache`, a plain class). The run is a SimPy process
(`_main`); SimPy's clock reaches the end of each token. Within a token nothing needs a SimPy
event: with one issuing stream every time is known when it is needed, the link applies its
completions lazily (`CopyLink.advance`), and so a cache hit, a load and a wait cost no event at all.

Per decoded token t and MoE layer l:
  1. attention (non-expert work) on the compute stream;
  2. gating picks the active experts (precomputed when the policy is stateless);
  3. each active expert that is absent is demand-loaded (priority 0) or placed on the CPU;
  4. the prefetch policy may start loads (priority 1) for later layers;
  5. optionally (AdapMoE) the layer first waits for in-flight prefetches aimed at it;
  6. active experts compute: resident ones first, then loaded ones in arrival order; a second
     request for an expert already loading waits for that same transfer.
A load takes a cache slot (the cache policy names victims among residents not in use by the
current layer; an in-flight load holds its slot); a demand load that cannot get one uses a
transient staging buffer; a prefetch that cannot get one is skipped. Prefill of each prompt runs
as one batch per layer (the union of its tokens' experts, compute growing with tokens) and gives
TTFT; no prefetch during prefill.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import simpy

from policies.base import CPU, LOAD, Context, GatingPolicy, PlacementPolicy, PrefetchPolicy
from sim.engine.admission import LoadAdmission
from sim.engine.cache import ABSENT, RESIDENT, ExpertCache
from sim.engine.link import DEMAND, PREFETCH, CopyLink, Transfer
from sim.engine.recorder import Recorder
from sim.engine.replay import replay_steps
from sim.machine.contention import MemoryBus
from sim.machine.cost import CostModel

_KIND = {DEMAND: "demand", PREFETCH: "prefetch"}


@contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector during a run. A run allocates a Transfer per load and
    keeps them all (events table) but creates no reference cycles, so the collections that the
    allocations trigger find nothing and cost a few percent of the run (`python -m sim bench`)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _done_s(tr: Transfer) -> float:
    return tr.done_s


@dataclass
class EngineOptions:
    pipelining: bool = False  # per-matrix pipelining: each of an expert's 3 GEMMs starts when its matrix is in
    prefill: bool = True  # simulate each prompt's prefill (gives TTFT)
    staging_buffers: int = 6  # transient buffers for demand loads that cannot take a cache slot
    timeline_tokens: int = 16  # compute ops are recorded for the first N decode tokens (report timeline)
    max_tokens: int = 0  # simulate at most this many decode tokens (0: all)


class Engine(LoadAdmission):
    def __init__(self, ctx: Context, cost: CostModel, gating: GatingPolicy, prefetch: PrefetchPolicy,
                 cache_policy, placement: PlacementPolicy, link: CopyLink, options: EngineOptions):
        self.ctx, self.cost, self.opt = ctx, cost, options
        self.gating, self.prefetch, self.cache_policy, self.placement = gating, prefetch, cache_policy, placement
        self.env = simpy.Environment()
        self.link = link
        link.on_done = self._on_loaded
        #: the memory bandwidth the link's copies leave to compute, where they share it (else None)
        self.bus = MemoryBus(cost.device.memory_bandwidth_Bps, cost.link_bandwidth_Bps, link) if cost.shared_link else None
        self.expert_work = cost.expert_work()
        self.cache: ExpertCache = ctx.cache
        self.L, self.E = ctx.layers, ctx.experts
        self.rec = Recorder(self.L)
        self.t = 0.0  # compute-stream clock (s)
        self.cpu_t = 0.0  # CPU-stream clock (s)
        self.inflight: dict[int, Transfer] = {}  # key -> its transfer while loading (cache or staging)
        self.unused_prefetch: set[int] = set()  # prefetched keys not yet used
        self.prefetch_by_layer: dict[int, list[Transfer]] = {}
        self.staging_in_use = 0
        self.prefetch_skipped = 0
        self.prefetch_cancelled = 0
        self.bytes_issued = 0.0
        #: prefetch only onto an idle channel (never queue a prefetch), if the prefetch policy says so
        self.prefetch_idle_only = bool(getattr(prefetch, "idle_only", False))
        #: demand loads cut in-flight prefetches short at a chunk boundary, if the prefetch policy says so
        self.yield_chunk_bytes = float(getattr(prefetch, "yield_chunk_bytes", 0.0) or 0.0)
        self.stall_s = 0.0
        self.cpu_wait_s = 0.0
        self.compute_busy_s = 0.0
        plan = ctx.gating_plan if ctx.gating_plan is not None else gating.plan()
        self.plan_ids = plan.ids.tolist() if plan is not None else None  # nested lists: fast scalar access
        #: [t][layer] -> keys of the experts that run (ids of -1, "not run", dropped)
        self.plan_keys = ([[[layer * self.E + e for e in ids if e >= 0] for layer, ids in enumerate(row)]
                           for row in self.plan_ids] if plan is not None else None)
        self.plan_w = plan.weights.tolist() if plan is not None else None
        self.plan_dL = plan.dL.tolist() if plan is not None else None
        #: the per-(token, layer) counts that only the plan decides (experts run, single-expert pairs, dL)
        #: are summed from it after the run instead of on the hot path (`_counts_from_plan`)
        self.plan = plan if plan is not None and self.placement.always_load else None
        self.decoded: list[int] = []  # trace indices of the decoded tokens, in order
        self.nbytes = cost.expert_bytes
        #: prefetches go to staging buffers, not cache slots (AdapMoE), if the prefetch policy says so
        self.prefetch_staging = bool(getattr(prefetch, "admit_on_use", False))
        #: in-flight prefetches are listed per target layer only when a layer must look at them
        self.track_prefetch_targets = bool(prefetch.wait_for_prefetch or self.prefetch_staging)

    # ------------------------------------------------------------------ public
    def run(self) -> Recorder:
        for key in self.cache_policy.warm_start():
            self.cache.insert_resident(key, self.nbytes)
            self.cache_policy.on_insert(key, -1)
        self.env.process(self._main())
        with _gc_paused():
            self.env.run()
        if self.plan is not None:
            self._counts_from_plan()
        self.link.advance(float("inf"))
        self.rec.loads.sort(key=lambda tr: tr.seqno)
        for key in self.unused_prefetch:  # prefetched and never used before the end
            self.rec.per_layer["prefetch_wasted"][key // self.E] += 1
        return self.rec

    # ------------------------------------------------------------------ helpers
    def _decide(self, t: int, layer: int) -> tuple[list[int], list[float], float]:
        if self.plan_ids is not None:
            return self.plan_ids[t][layer], self.plan_w[t][layer], self.plan_dL[t][layer]
        return self.gating.decide(t, layer)

    def _load(self, key: int, priority: int, t: int, layer: int, nbytes: float | None = None,
              staging: bool = False) -> Transfer | None:
        """Issue a transfer of expert `key` at `self.t`; None if a prefetch finds no room.

        `staging=True` loads into a transient staging buffer instead of a cache slot (AdapMoE's
        prefetches, low-precision copies); a demand load that gets no slot goes there too."""
        link, now = self.link, self.t
        heap = link.running_heap
        if heap and heap[0][0] <= now:
            link.advance(now)  # apply completions first: they free slots and make experts evictable
        if nbytes is None:
            nbytes = self.nbytes
        staging = self._admit(key, priority, t, nbytes, staging, len(heap) >= link.channels)
        if staging is None:
            return None
        if priority == DEMAND and self.yield_chunk_bytes:
            self._preempt_prefetch()
        tr = link.submit(key, nbytes, priority, now, (_KIND[priority], t, layer, staging))
        self.bytes_issued += nbytes
        self._note_issued(tr, key, priority)
        return tr

    def _on_loaded(self, tr: Transfer) -> None:
        """CopyLink callback at a transfer's completion (applied lazily, in time order)."""
        if tr.cancelled:  # a prefetch cut short for a demand load: nothing usable arrived
            if self.inflight.get(tr.key) is tr:
                del self.inflight[tr.key]
            if tr.tag[3]:
                self.staging_in_use -= 1
            else:
                self.cache.abort_load(tr.key)
                self.cache_policy.on_evict(tr.key)
            if tr.key in self.unused_prefetch:
                self.unused_prefetch.discard(tr.key)
                self.rec.per_layer["prefetch_wasted"][tr.key // self.E] += 1
            self.prefetch_cancelled += 1
            return
        if not tr.tag[3]:  # a cache load (a staging buffer is released after its compute)
            key, inflight = tr.key, self.inflight
            if inflight.get(key) is tr:
                del inflight[key]
            self.cache.finish_load(key)

    def _preempt_prefetch(self) -> None:
        """No channel free for a demand load: cut the in-flight prefetch that frees one soonest.

        A prefetch of an expert the current layer needs (pinned) is never cut."""
        link = self.link
        busy = link.running()
        if len(busy) < link.channels:
            return
        cands = [x for x in busy if x.priority == PREFETCH and not x.cancelled and x.key not in self.cache.pinned]
        if not cands:
            return
        chunk = self.yield_chunk_bytes
        best = min(cands, key=lambda x: (self._cut_time(x, chunk), x.seqno))
        if self._cut_time(best, chunk) < min(x.done_s for x in busy):
            link.preempt(best, self.t, chunk)

    def _cut_time(self, tr: Transfer, chunk_bytes: float) -> float:
        chunk_s = chunk_bytes / self.link.bandwidth_Bps
        body0 = tr.start_s + self.link.latency_s
        if self.t <= body0:
            return min(tr.done_s, body0)
        return min(tr.done_s, body0 + -(-(self.t - body0) // chunk_s) * chunk_s)

    def _release(self, trn: Transfer, t: int) -> None:
        """After computing a loaded expert: free its staging buffer, or note the cache access."""
        if trn.tag[3]:  # staging data is dropped once used: a later request loads it again
            self._free_staging(trn)
            if trn.tag[0] == "prefetch" and self.prefetch_staging and trn.nbytes == self.nbytes:
                # AdapMoE: a right prefetch enters the layer's cache once used, evicting its LRU expert
                victims = self.cache_policy.victims(trn.key, self.nbytes, t)
                if victims is not None:
                    for v in victims:
                        self._evict(v)
                    self.cache.insert_resident(trn.key, self.nbytes)
                    self.cache_policy.on_insert(trn.key, t)
                    self.cache_policy.on_access(trn.key, t)
        else:
            self.cache_policy.on_access(trn.key, t)

    def _free_staging(self, trn: Transfer) -> None:
        self.staging_in_use -= 1
        if self.inflight.get(trn.key) is trn:
            del self.inflight[trn.key]

    def _evict(self, key: int) -> None:
        self.cache.evict(key)
        self.cache_policy.on_evict(key)
        if key in self.unused_prefetch:
            self.unused_prefetch.discard(key)
            self.rec.per_layer["prefetch_wasted"][key // self.E] += 1

    def _expert_s(self, start_s: float, tokens: int = 1, fraction: float = 1.0) -> float:
        """An expert (or `fraction` of it) on `tokens` tokens starting at `start_s`; on a link that shares
        the device's memory, slowed by the copies in flight meanwhile (`sim/machine/contention.py`)."""
        cost = self.cost
        if self.bus is not None:
            work = self.expert_work if tokens == 1 and fraction == 1.0 else cost.expert_work(tokens, fraction)
            return work.shared_s(start_s, self.bus)
        assert fraction == 1.0, "a fraction of an expert is only timed on a shared link"
        return cost.expert_s if tokens == 1 else cost.expert_compute_s(tokens)

    def _attention_s(self, start_s: float, context_tokens: int, new_tokens: int = 1) -> float:
        """One layer's non-expert work starting at `start_s` (slowed on a shared link, as `_expert_s`)."""
        cost = self.cost
        if self.bus is not None:
            return cost.attention_work(context_tokens, new_tokens).shared_s(start_s, self.bus)
        if new_tokens == 1:
            return cost.attention_decode_s(context_tokens)
        return cost.attention_s(context_tokens, new_tokens)

    def _compute_loaded(self, tr: Transfer, tokens: int, rec_ops: bool, t_index: int, layer: int) -> float:
        """Compute an expert whose transfer has started; returns the stall it caused.

        Without pipelining the expert starts when its transfer is done; with it, each of its three
        GEMMs starts when its matrix is in and the previous GEMM is done. On a link that shares the
        device's memory bandwidth, the copies in flight while it runs slow it down."""
        cost = self.cost
        first_s = tr.start_s + cost.link_latency_s  # the first byte is in
        per_matrix_s = (tr.done_s - first_s) / 3.0
        start = self.t
        stall = busy = 0.0
        if self.opt.pipelining:
            # three matrices arrive in order; GEMM i starts when matrix i is in and GEMM i-1 is done
            t = self.t
            whole = None if cost.shared_link else self._expert_s(t, tokens)  # each GEMM a third of it
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
            self.t = t
        else:
            if tr.done_s > self.t:
                stall = tr.done_s - self.t
                self.t = tr.done_s
            busy = self._expert_s(self.t, tokens)
            self.t += busy
        self.compute_busy_s += busy
        if rec_ops:
            self.rec.op("compute", t_index, layer, f"expert {tr.key % self.E}", start + stall, self.t)
        return stall

    # ------------------------------------------------------------------ the run
    def _main(self):
        opt = self.opt
        for step in replay_steps(self.ctx.trace, opt.prefill, opt.max_tokens, opt.timeline_tokens):
            if step[0] == "prefill":
                self._prefill(step[1])
            else:
                self._decode_token(step[1], step[2])
            yield self.env.timeout(self.t - self.env.now)  # SimPy's clock: the end of this step

    def _decode_token(self, t: int, rec_ops: bool) -> None:
        # The simulator's hot path (`python -m sim bench` measures it). Attributes and bound methods
        # are bound to locals, the gate's completion check peeks the link's heap before calling
        # `advance`, and the common cases of `_compute_loaded` and `_release` are written inline.
        cost, cache, E, link, ctx = self.cost, self.cache, self.E, self.link, self.ctx
        state, inflight, unused, pinned = cache.state, self.inflight, self.unused_prefetch, cache.pinned
        heap, advance = link.running_heap, link.advance
        shared = cost.shared_link
        pl_ = self.rec.per_layer
        p_used, p_late, p_stall, p_demand = pl_["prefetch_used"], pl_["prefetch_late"], pl_["stall_s"], pl_["demand_loads"]
        p_needed, p_hits, p_run, p_single, p_dL = (pl_[k] for k in ("needed", "hits", "experts_run", "single_pairs", "dL"))
        start, stall0, cpuw0, bytes0 = self.t, self.stall_s, self.cpu_wait_s, self.bytes_issued
        pos = int(ctx.trace.pos[t])
        needed = hits = single = demand = 0
        dL_tok = 0.0
        always_load, place = self.placement.always_load, self.placement.place
        on_layer, on_access = self.prefetch.on_layer, self.cache_policy.on_access
        load, release, compute_loaded = self._load, self._release, self._compute_loaded
        expert_s, bus = cost.expert_s, self.bus
        expert_shared_s = self.expert_work.shared_s
        simple_compute = not self.opt.pipelining
        attn_s = cost.attention_decode_s(pos)  # without contention
        attn_work = cost.attention_work(pos) if shared else None
        keys_row = self.plan_keys[t] if self.plan_keys is not None else None
        if keys_row is not None:
            w_row, dL_row = self.plan_w[t], self.plan_dL[t]
        wait_prefetch = self.prefetch.wait_for_prefetch
        stop_on_skip = getattr(self.prefetch, "stop_at_first_skip", False)
        prefetch_by_layer, prefetch_staging = self.prefetch_by_layer, self.prefetch_staging
        counts_from_plan = self.plan is not None
        # `now` is the compute stream's clock (`self.t`) in a local; it is written back to `self.t`
        # before every call that reads or moves it
        now = self.t
        for layer in range(self.L):
            a0 = now
            now += attn_work.shared_s(a0, bus) if shared else attn_s
            self.compute_busy_s += now - a0
            if rec_ops:
                self.rec.op("compute", t, layer, "attention", a0, now)
            self.t = gate_t = now
            ctx.now_layer = layer
            if heap and heap[0][0] <= gate_t:
                advance(gate_t)  # transfers' states as of now (queued ones may have started and ended)
            if keys_row is not None:
                keys, ws, dL = keys_row[layer], w_row[layer], dL_row[layer]
            else:
                ids, ws, dL = self.gating.decide(t, layer)
                keys = [layer * E + e for e in ids if e >= 0]
            n = len(keys)
            pinned.update(keys)
            ready: list[int] = []  # resident (or arrived by now) keys
            waiting: list[Transfer] = []
            cpu_keys: list[int] | None = None  # made when an expert is placed on the CPU
            layer_hits = 0
            for key in keys:
                trn = inflight.get(key)
                if trn is None and state[key] == RESIDENT:
                    ready.append(key)
                    layer_hits += 1
                elif trn is not None:  # loading: wait for that same transfer
                    if 0.0 <= trn.start_s and trn.done_s <= gate_t:
                        layer_hits += 1
                        if trn.tag[3]:  # arrived in a staging buffer: computed from it, then released
                            waiting.append(trn)
                        else:
                            ready.append(key)
                    else:
                        waiting.append(trn)
                        if key in unused:
                            p_late[layer] += 1
                elif not always_load and (where := place(key, t, w := ws[keys.index(key)])) != LOAD:
                    if where == CPU:
                        if cpu_keys is None:
                            cpu_keys = []
                        cpu_keys.append(key)
                    else:  # LOW: a low-precision copy into a staging buffer, lossy
                        waiting.append(load(key, DEMAND, t, layer, self.placement.low_bytes, True))
                        demand += 1
                        p_demand[layer] += 1
                        dL += self.placement.dL(layer, w)
                    continue
                else:
                    waiting.append(load(key, DEMAND, t, layer))
                    demand += 1
                    p_demand[layer] += 1
                    continue
                if key in unused:
                    unused.discard(key)
                    p_used[layer] += 1
            # prefetch for later layers, issued after this layer's demand loads
            for pk in on_layer(t, layer):
                if state[pk] == ABSENT and pk not in inflight:
                    if load(pk, PREFETCH, t, layer, None, prefetch_staging) is None and stop_on_skip:
                        break
            # AdapMoE: the layer waits for in-flight prefetches aimed at it, used or not
            pending = prefetch_by_layer.pop(layer, None) if prefetch_by_layer else None
            if pending and wait_prefetch:
                for trn in pending:
                    link.wait_started(trn)
                    if trn.done_s > now:
                        self.stall_s += trn.done_s - now
                        p_stall[layer] += trn.done_s - now
                        now = trn.done_s
            # compute: resident first, then loads in arrival order
            for key in ready:
                c0 = now
                if shared:  # slowed by the copies in flight while it runs
                    now += expert_shared_s(c0, bus)
                else:
                    now += expert_s
                self.compute_busy_s += now - c0
                on_access(key, t)
                if rec_ops:
                    self.rec.op("compute", t, layer, f"expert {key % E}", c0, now)
            if waiting:
                for trn in waiting:
                    if trn.start_s < 0.0:  # queued: look ahead until it is on a channel
                        link.wait_started(trn)
                if len(waiting) > 1:
                    waiting.sort(key=_done_s)
                for trn in waiting:
                    if simple_compute and not rec_ops:  # `_compute_loaded`, inline
                        if trn.done_s > now:
                            s = trn.done_s - now
                            now = trn.done_s
                        else:
                            s = 0.0
                        if shared:  # slowed by the copies in flight while it runs
                            dur = expert_shared_s(now, bus)
                        else:
                            dur = expert_s
                        now += dur
                        self.compute_busy_s += dur
                    else:
                        self.t = now
                        s = compute_loaded(trn, 1, rec_ops, t, layer)
                        now = self.t
                    self.stall_s += s
                    p_stall[layer] += s
                    if trn.tag[3]:
                        release(trn, t)
                    else:  # `_release` of a cache load, inline
                        on_access(trn.key, t)
            self.t = now
            if cpu_keys:
                self._run_on_cpu(cpu_keys, gate_t, t, layer, rec_ops)
                now = self.t
            if pending and prefetch_staging:  # wrong prefetches are dropped with their buffers
                for trn in pending:
                    if trn.tag[3] and inflight.get(trn.key) is trn:
                        self._free_staging(trn)
                        if trn.key in unused:
                            unused.discard(trn.key)
                            pl_["prefetch_wasted"][layer] += 1
            pinned.clear()
            hits += layer_hits
            p_hits[layer] += layer_hits
            if not counts_from_plan:
                needed += n
                single += n == 1
                dL_tok += dL
                p_needed[layer] += n
                p_run[layer] += n
                p_single[layer] += n == 1
                p_dL[layer] += dL
        self.decoded.append(t)
        nbytes = self.bytes_issued - bytes0
        row = [("seq", int(ctx.trace.seq[t])), ("pos", pos), ("start_s", start), ("end_s", self.t),
               ("stall_s", self.stall_s - stall0), ("cpu_wait_s", self.cpu_wait_s - cpuw0),
               ("demand_loads", demand), ("bytes_loaded", nbytes), ("hits", hits)]
        if not counts_from_plan:
            row += [("needed", needed), ("experts_run", needed), ("single_pairs", single), ("dL", dL_tok)]
        tokens = self.rec.tokens
        for name, v in row:
            tokens[name].append(v)

    def _counts_from_plan(self) -> None:
        """Per-token and per-layer experts run, single-expert pairs and dL of the decoded tokens,
        from the gating plan (with `always_load` placement nothing at run time changes them).
        Sums run in token and layer order (cumsum), as the hot path would add them."""
        rows = np.asarray(self.decoded, dtype=np.int64)
        n = (self.plan.ids[rows] >= 0).sum(-1)  # [tokens, L] experts run
        single = (n == 1).astype(np.int64)
        dL = np.asarray(self.plan.dL, dtype=np.float64)[rows]  # [tokens, L]
        tok, pl_ = self.rec.tokens, self.rec.per_layer
        tok["needed"] = n.sum(1).tolist()
        tok["experts_run"] = list(tok["needed"])
        tok["single_pairs"] = single.sum(1).tolist()
        tok["dL"] = (np.cumsum(dL, axis=1)[:, -1] if len(rows) else np.zeros(0)).tolist()
        for name, per_layer in (("needed", n), ("experts_run", n), ("single_pairs", single)):
            pl_[name] = (np.asarray(pl_[name]) + per_layer.sum(0)).tolist()
        if len(rows):
            pl_["dL"] = np.cumsum(np.vstack([np.asarray(pl_["dL"])[None, :], dL]), axis=0)[-1].tolist()

    def _run_on_cpu(self, keys: list[int], ready_s: float, t: int, layer: int, rec_ops: bool) -> None:
        """Experts placed on the CPU run on the CPU stream; the layer ends when both streams are done."""
        start = max(self.cpu_t, ready_s)
        end = start + len(keys) * self.cost.expert_compute_s(1, on_cpu=True)
        self.cpu_t = end
        self.rec.per_layer["cpu_experts"][layer] += len(keys)
        if rec_ops:
            self.rec.op("cpu", t, layer, f"{len(keys)} expert(s)", start, end)
        if end > self.t:
            self.cpu_wait_s += end - self.t
            self.t = end

    def _prefill(self, prompt: list[int]) -> None:
        """One batch per layer over the prompt: the union of experts, each on its tokens."""
        cache, E = self.cache, self.E
        start = self.t
        P = len(prompt)
        for layer in range(self.L):
            self.ctx.now_layer = layer
            self.t += self._attention_s(self.t, 0, P)
            counts: dict[int, int] = {}
            for t in prompt:
                ids, _, _ = self._decide(t, layer)
                for e in ids:
                    if e >= 0:
                        counts[layer * E + e] = counts.get(layer * E + e, 0) + 1
            self.link.advance(self.t)
            order = sorted(counts, key=lambda k: (cache.state[k] != RESIDENT, -counts[k], k))
            todo: list[int] = []
            for key in order:
                if cache.state[key] == RESIDENT:
                    self.t += self._expert_s(self.t, counts[key])
                    self.cache_policy.on_access(key, prompt[0])
                else:
                    todo.append(key)
            # loads: keep at most `staging_buffers` outstanding; compute each as it arrives
            outstanding: list[Transfer] = []
            while todo or outstanding:
                while todo and len(outstanding) < self.opt.staging_buffers:
                    key = todo.pop(0)
                    self.link.advance(self.t)
                    if key in self.inflight:  # already on its way (e.g. a prefetch from the last token)
                        outstanding.append(self.inflight[key])
                        continue
                    if cache.state[key] == RESIDENT:  # arrived meanwhile
                        self.t += self._expert_s(self.t, counts[key])
                        self.cache_policy.on_access(key, prompt[0])
                        continue
                    cache.pinned.update(tr_.key for tr_ in outstanding)
                    outstanding.append(self._load(key, DEMAND, prompt[0], layer))
                    cache.pinned.clear()
                trn = outstanding.pop(0)
                self.link.wait_started(trn)
                self.stall_s += self._compute_loaded(trn, counts[trn.key], False, prompt[0], layer)
                self._release(trn, prompt[0])
        pf = self.rec.prefill
        pf["seq"].append(int(self.ctx.trace.seq[prompt[0]]))
        pf["tokens"].append(P)
        pf["start_s"].append(start)
        pf["end_s"].append(self.t)
