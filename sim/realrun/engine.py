"""The real-run loop: the simulator's engine (`sim/engine/engine.py`) with real copies and real compute.

Per decoded token t and MoE layer l, in the simulator's order and with the same policy calls:
  1. non-expert work (the stand-in GEMV; a live model runs its own attention);
  2. gating (the policy's plan, or `decide`), experts pinned;
  3. each active expert: resident -> ready; loading -> wait for that transfer; absent -> the
     placement policy: a demand load (priority 0) into a slot the cache policy frees, or the
     CPU worker (placement=cpu), which starts at once;
  4. the prefetch policy's loads (priority 1) for later layers;
  5. (AdapMoE) wait for this layer's in-flight prefetches;
  6. compute: resident experts first, then loaded ones in arrival order (per matrix when
     pipelining); then wait for the CPU worker; the block output sums experts by expert id.
Cache residency lives in the same `sim.engine.cache.ExpertCache` the policies read; a completed copy is
applied (LOADING -> RESIDENT) where the simulator applies it: at `link.advance()`. Each cache
entry and each staging transfer owns one buffer of the `SlotPool`; a used AdapMoE staged
prefetch enters the cache by handing its buffer over (no copy). Times are wall-clock seconds
from the start of the run; a stall is time the main thread spent blocked on a copy. On CUDA a
token ends when its compute stream has run (copies in flight on the copy streams go on), busy
time comes from CUDA events, and the compute intervals in `events.parquet` are the host's
(launch) intervals of the asynchronous kernels.
"""

from __future__ import annotations

import time

from policies.base import CPU, LOAD
from sim.engine.admission import LoadAdmission
from sim.engine.cache import ABSENT, RESIDENT
from sim.engine.recorder import Recorder
from sim.engine.replay import replay_steps
from sim.errors import UserError
from sim.realrun.link import DEMAND, PREFETCH, CopyWorker


class RealEngine(LoadAdmission):
    def __init__(self, sim_engine, backend, store, pool, kernels, cpu_worker=None, channels: int = 1):
        src = sim_engine  # a `sim.engine.engine.Engine` built by the simulator's builder: its policies and plan
        self.ctx, self.opt = src.ctx, src.opt
        self.gating, self.prefetch, self.cache_policy, self.placement = (
            src.gating, src.prefetch, src.cache_policy, src.placement)
        self.plan_ids, self.plan_w, self.plan_dL = src.plan_ids, src.plan_w, src.plan_dL
        self.prefetch_idle_only, self.prefetch_staging = src.prefetch_idle_only, src.prefetch_staging
        self.yield_chunk_bytes = src.yield_chunk_bytes
        if getattr(self.placement, "low_bytes", 0.0) and not self.placement.always_load:
            raise UserError("realrun does not run low-precision copies (placement low_precision_on_miss)")
        self.backend, self.store, self.pool, self.k, self.cpu = backend, store, pool, kernels, cpu_worker
        self.cache = self.ctx.cache
        self.L, self.E = self.ctx.layers, self.ctx.experts
        self.nbytes = src.nbytes
        self.rec = Recorder(self.L)
        self.t0 = time.perf_counter()
        self.link = CopyWorker(store, pool, self.now, channels=channels, chunk_bytes=self.yield_chunk_bytes,
                               on_done=self._on_loaded)
        self.buf_of: dict[int, int] = {}  # cache key (loading or resident) -> its pool buffer
        self.inflight: dict = {}
        self.unused_prefetch: set[int] = set()
        self.prefetch_by_layer: dict[int, list] = {}
        self.track_prefetch_targets = src.track_prefetch_targets
        self.staging_in_use = 0
        self.orphans: set = set()  # dropped staged prefetches whose copy has not ended yet
        self.prefetch_skipped = self.prefetch_cancelled = 0
        self.stall_s = self.cpu_wait_s = self.compute_busy_s = 0.0
        self._busy_pairs: list = []  # CUDA: (start event, end event, idle s) not yet added up
        self.t_end = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.t0

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
        """End it; `idle_s` (a pipelined expert's waits for its matrices) is not busy time. On CUDA
        the pair is read at the end of the token, once the stream has run it."""
        if not self.backend.cuda:
            self.compute_busy_s += time.perf_counter() - begun - idle_s
            return
        import torch

        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self._busy_pairs.append((begun, ev, idle_s))

    def _busy_collect(self) -> None:
        """CUDA: add up the event pairs of ops the stream has finished (after `backend.sync()`)."""
        for a, b, idle_s in self._busy_pairs:
            self.compute_busy_s += max(0.0, a.elapsed_time(b) / 1e3 - idle_s)
        self._busy_pairs = []

    def close(self) -> None:
        self.link.close()
        self.link.on_done = None  # the link held this engine (a cycle): freed now, pinned buffers included
        if self.cpu is not None:
            self.cpu.close()

    # ------------------------------------------------------------------ set-up
    def warm_start(self) -> None:
        """The cache policy's initial residents, copied in before the clock starts."""
        for key in self.cache_policy.warm_start():
            self.cache.insert_resident(key, self.nbytes)
            self.cache_policy.on_insert(key, -1)
            self.buf_of[key] = buf = self.pool.take()
            self.store.read_into(key, self.pool.matrices(buf))
        self.backend.sync_all()
        self.t0 = time.perf_counter()

    def finish(self) -> Recorder:
        for tr in list(self.inflight.values()) + list(self.orphans):
            self.link.wait(tr)
        self.link.advance()
        self.rec.loads.sort(key=lambda tr: tr.seqno)
        for key in self.unused_prefetch:
            self.rec.per_layer["prefetch_wasted"][key // self.E] += 1
        return self.rec

    # ------------------------------------------------------------------ loads (as Engine._load)
    def _decide(self, t: int, layer: int):
        if self.plan_ids is not None:
            return self.plan_ids[t][layer], self.plan_w[t][layer], self.plan_dL[t][layer]
        return self.gating.decide(t, layer)

    def _load(self, key: int, priority: int, t: int, layer: int, staging: bool = False):
        """As `Engine._load`: the same admission (`sim.engine.admission`), then a real copy into a buffer."""
        self.link.advance()
        staging = self._admit(key, priority, t, self.nbytes, staging, self.link.busy_channels() >= self.link.channels)
        if staging is None:
            return None
        buf = self.pool.take()
        if not staging:
            self.buf_of[key] = buf
        if priority == DEMAND and self.yield_chunk_bytes:
            self._preempt_prefetch()
        kind = "demand" if priority == DEMAND else "prefetch"
        tr = self.link.submit(key, self.nbytes, priority, (kind, t, layer, staging), buf, after=self._slot_free_event())
        self._note_issued(tr, key, priority)
        return tr

    def _slot_free_event(self):
        """CUDA: kernels already queued may still read the evicted expert in this buffer; the copy
        stream waits for them (an event recorded now on the compute stream). None on the CPU."""
        if not self.backend.cuda:
            return None
        import torch

        ev = torch.cuda.Event()
        ev.record()
        return ev

    def _on_loaded(self, tr) -> None:
        tr.applied = True
        if tr in self.orphans:  # a dropped staged prefetch: its buffer is free once the copy ended
            self.orphans.discard(tr)
            self.pool.give(tr.buf)
            return
        if tr.cancelled:
            if self.inflight.get(tr.key) is tr:
                del self.inflight[tr.key]
            if tr.tag[3]:
                self.staging_in_use -= 1
                self.pool.give(tr.buf)
            else:
                self.cache.abort_load(tr.key)
                self.cache_policy.on_evict(tr.key)
                self.pool.give(self.buf_of.pop(tr.key))
            if tr.key in self.unused_prefetch:
                self.unused_prefetch.discard(tr.key)
                self.rec.per_layer["prefetch_wasted"][tr.key // self.E] += 1
            self.prefetch_cancelled += 1
            return
        if not tr.tag[3]:
            if self.inflight.get(tr.key) is tr:
                del self.inflight[tr.key]
            self.cache.finish_load(tr.key)

    def _preempt_prefetch(self) -> None:
        """Every channel busy: ask a running prefetch the current layer does not need to yield."""
        busy = self.link.running()
        if len(busy) < self.link.channels:
            return
        for x in busy:
            if x.priority == PREFETCH and x.key not in self.cache.pinned:
                self.link.request_cancel(x)
                return

    def _evict(self, key: int) -> None:
        self.cache.evict(key)
        self.cache_policy.on_evict(key)
        self.pool.give(self.buf_of.pop(key))
        if key in self.unused_prefetch:
            self.unused_prefetch.discard(key)
            self.rec.per_layer["prefetch_wasted"][key // self.E] += 1

    def _release(self, trn, t: int) -> None:
        if not trn.tag[3]:
            self.cache_policy.on_access(trn.key, t)
            return
        self.staging_in_use -= 1
        if self.inflight.get(trn.key) is trn:
            del self.inflight[trn.key]
        if trn.tag[0] == "prefetch" and self.prefetch_staging and trn.nbytes == self.nbytes:
            victims = self.cache_policy.victims(trn.key, self.nbytes, t)
            if victims is not None:  # AdapMoE: a right prefetch enters the cache with its buffer
                for v in victims:
                    self._evict(v)
                self.cache.insert_resident(trn.key, self.nbytes)
                self.cache_policy.on_insert(trn.key, t)
                self.cache_policy.on_access(trn.key, t)
                self.buf_of[trn.key] = trn.buf
                return
        self.pool.give(trn.buf)

    def _drop_staged(self, trn) -> None:
        """A staged prefetch its layer did not use is dropped (as Engine._free_staging); a copy
        still in flight keeps its buffer until it ends (the pool has spare buffers for that)."""
        self.staging_in_use -= 1
        if self.inflight.get(trn.key) is trn:
            del self.inflight[trn.key]
        if trn.applied:
            self.pool.give(trn.buf)
        else:
            self.orphans.add(trn)

    # ------------------------------------------------------------------ compute
    def _compute_loaded(self, trn, tokens: int, weight: float):
        """Compute an expert whose copy was issued; returns (output, stall seconds)."""
        stall = 0.0

        def wait(i: int) -> None:
            nonlocal stall
            if trn.done or trn.progress >= i:
                return
            w0 = time.perf_counter()
            self.link.wait(trn, i)
            stall += time.perf_counter() - w0

        if not self.opt.pipelining:
            wait(len(self.pool.pools))
        begun = self._busy_begin()
        out = self.k.expert(self.pool.matrices(trn.buf), weight, tokens, wait)
        self._busy_end(begun, stall if self.opt.pipelining else 0.0)
        return out, stall

    # ------------------------------------------------------------------ one MoE layer
    def moe_layer(self, t: int, layer: int, rec_ops: bool, tally: dict):
        """Steps 2-6 for token t at `layer`; returns the kernels' combined output."""
        cache, E, link, ctx = self.cache, self.E, self.link, self.ctx
        state, inflight, unused = cache.state, self.inflight, self.unused_prefetch
        pl_ = self.rec.per_layer
        gate_s = self.now()
        ctx.now_layer = layer
        link.advance()
        ids, ws, dL = self._decide(t, layer)
        base = layer * E
        keys = [base + e for e in ids if e >= 0]
        weight = {base + e: w for e, w in zip(ids, ws, strict=False) if e >= 0}
        cache.pinned.update(keys)
        ready, waiting, cpu_keys = [], [], []
        hits = 0
        for j, key in enumerate(keys):
            trn = inflight.get(key)
            if trn is not None and trn.cancel_requested:  # a prefetch told to yield: settle it first
                link.wait(trn)
                link.advance()
                trn = inflight.get(key)
            if trn is None and state[key] == RESIDENT:
                ready.append(key)
                hits += 1
            elif trn is not None:
                if trn.done and not trn.cancelled:
                    hits += 1
                    if trn.tag[3]:
                        waiting.append(trn)
                    else:
                        ready.append(key)
                else:
                    waiting.append(trn)
                    if key in unused:
                        pl_["prefetch_late"][layer] += 1
            elif not self.placement.always_load and (where := self.placement.place(key, t, ws[j])) != LOAD:
                if where != CPU:
                    raise UserError(f"realrun does not support placement decision {where!r}")
                cpu_keys.append(key)
                continue
            else:
                waiting.append(self._load(key, DEMAND, t, layer))
                tally["demand"] += 1
                pl_["demand_loads"][layer] += 1
                continue
            if key in unused:
                unused.discard(key)
                pl_["prefetch_used"][layer] += 1
        if cpu_keys:  # the CPU worker starts at once, beside the device work below
            jobs = [(key, lambda key=key: self.k.cpu_expert(self.store.host_matrices(key), weight[key]))
                    for key in cpu_keys]
            self.cpu.submit(jobs)
            pl_["cpu_experts"][layer] += len(cpu_keys)
        for pk in self.prefetch.on_layer(t, layer):
            if state[pk] == ABSENT and pk not in inflight:
                if (self._load(pk, PREFETCH, t, layer, staging=self.prefetch_staging) is None
                        and getattr(self.prefetch, "stop_at_first_skip", False)):
                    break
        pending = self.prefetch_by_layer.pop(layer, None)
        if pending and self.prefetch.wait_for_prefetch:
            for trn in pending:
                if not trn.done:
                    w0 = time.perf_counter()
                    link.wait(trn)
                    s = time.perf_counter() - w0
                    self.stall_s += s
                    pl_["stall_s"][layer] += s
        outs = {}
        for key in ready:
            c0 = self.now()
            begun = self._busy_begin()
            outs[key] = self.k.expert(self.pool.matrices(self.buf_of[key]), weight[key], 1)
            self._busy_end(begun)
            self.cache_policy.on_access(key, t)
            if rec_ops:
                self.rec.op("compute", t, layer, f"expert {key % E}", c0, self.now())
        while waiting:
            trn = min(waiting, key=link.order_key)
            waiting.remove(trn)
            c0 = self.now()
            outs[trn.key], s = self._compute_loaded(trn, 1, weight[trn.key])
            self.stall_s += s
            pl_["stall_s"][layer] += s
            if rec_ops:
                self.rec.op("compute", t, layer, f"expert {trn.key % E}", c0 + s, self.now())
            link.advance()
            self._release(trn, t)
        if cpu_keys:
            w0 = self.now()
            outs.update(self.cpu.wait())
            self.cpu_wait_s += self.now() - w0
            if rec_ops:
                self.rec.op("cpu", t, layer, f"{len(cpu_keys)} expert(s)", gate_s, self.now())
        if pending and self.prefetch_staging:
            for trn in pending:
                if trn.tag[3] and inflight.get(trn.key) is trn:
                    self._drop_staged(trn)
                    if trn.key in unused:
                        unused.discard(trn.key)
                        pl_["prefetch_wasted"][layer] += 1
        cache.pinned.clear()
        n = len(keys)
        tally["needed"] += n
        tally["hits"] += hits
        tally["single"] += n == 1
        tally["dL"] += dL
        pl_["needed"][layer] += n
        pl_["hits"][layer] += hits
        pl_["experts_run"][layer] += n
        pl_["single_pairs"][layer] += n == 1
        pl_["dL"][layer] += dL
        return self.k.combine(outs)

    # ------------------------------------------------------------------ tokens
    def begin_token(self) -> dict:
        return {"start": self.t_end, "stall0": self.stall_s, "cpu0": self.cpu_wait_s, "loads0": len(self.rec.loads),
                "demand": 0, "needed": 0, "hits": 0, "single": 0, "dL": 0.0}

    def end_token(self, t: int, tally: dict) -> None:
        self.backend.sync()
        end = self.now()
        self._busy_collect()
        self.t_end = end
        tr = self.ctx.trace
        nbytes = float(sum(x.nbytes for x in self.rec.loads[tally["loads0"]:]))
        for name, v in (("seq", int(tr.seq[t])), ("pos", int(tr.pos[t])), ("start_s", tally["start"]),
                        ("end_s", end), ("stall_s", self.stall_s - tally["stall0"]),
                        ("cpu_wait_s", self.cpu_wait_s - tally["cpu0"]), ("demand_loads", tally["demand"]),
                        ("bytes_loaded", nbytes), ("needed", tally["needed"]), ("hits", tally["hits"]),
                        ("experts_run", tally["needed"]), ("single_pairs", tally["single"]), ("dL", tally["dL"])):
            self.rec.tokens[name].append(v)

    def decode_token(self, t: int, rec_ops: bool) -> None:
        """One decode token of a synthetic run: the stand-in, then the MoE layer, per layer."""
        tally = self.begin_token()
        pos = int(self.ctx.trace.pos[t])
        for layer in range(self.L):
            a0 = self.now()
            begun = self._busy_begin()
            self.k.attention(layer, pos)
            self._busy_end(begun)
            a1 = self.now()
            if rec_ops:
                self.rec.op("compute", t, layer, "attention", a0, a1)
            self.moe_layer(t, layer, rec_ops, tally)
        self.end_token(t, tally)

    def prefill(self, prompt: list[int]) -> None:
        """One batch per layer over the prompt, as Engine._prefill."""
        cache, E = self.cache, self.E
        start = self.t_end
        P = len(prompt)
        for layer in range(self.L):
            self.ctx.now_layer = layer
            self.k.attention(layer, 0, P)
            counts: dict[int, int] = {}
            for t in prompt:
                for e in self._decide(t, layer)[0]:
                    if e >= 0:
                        counts[layer * E + e] = counts.get(layer * E + e, 0) + 1
            self.link.advance()
            order = sorted(counts, key=lambda k: (cache.state[k] != RESIDENT, -counts[k], k))
            todo = []
            for key in order:
                if cache.state[key] == RESIDENT:
                    self.k.expert(self.pool.matrices(self.buf_of[key]), 1.0, counts[key])
                    self.cache_policy.on_access(key, prompt[0])
                else:
                    todo.append(key)
            outstanding = []
            while todo or outstanding:
                while todo and len(outstanding) < self.opt.staging_buffers:
                    key = todo.pop(0)
                    self.link.advance()
                    if key in self.inflight:  # already on its way (e.g. a prefetch from the last token)
                        outstanding.append(self.inflight[key])
                        continue
                    if cache.state[key] == RESIDENT:  # arrived meanwhile
                        self.k.expert(self.pool.matrices(self.buf_of[key]), 1.0, counts[key])
                        self.cache_policy.on_access(key, prompt[0])
                        continue
                    cache.pinned.update(x.key for x in outstanding)
                    outstanding.append(self._load(key, DEMAND, prompt[0], layer))
                    cache.pinned.clear()
                trn = outstanding.pop(0)
                self.stall_s += self._compute_loaded(trn, counts[trn.key], 1.0)[1]
                self.link.advance()
                self._release(trn, prompt[0])
        self.backend.sync()
        self.t_end = self.now()
        self._busy_collect()
        pf = self.rec.prefill
        pf["seq"].append(int(self.ctx.trace.seq[prompt[0]]))
        pf["tokens"].append(P)
        pf["start_s"].append(start)
        pf["end_s"].append(self.t_end)

    def run_trace(self) -> Recorder:
        """Replay the trace in the simulator's order (`sim.engine.replay`)."""
        opt = self.opt
        self.t_end = self.now()
        for step in replay_steps(self.ctx.trace, opt.prefill, opt.max_tokens, opt.timeline_tokens):
            if step[0] == "prefill":
                self.prefill(step[1])
            else:
                self.decode_token(step[1], step[2])
        return self.finish()
