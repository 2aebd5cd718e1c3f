"""A serving run: requests arrive, the scheduler batches them, the engine runs each batched step.

`Serving.process()` is the run as one generator, executed by either simulated machine as the
replay is (`sim.engine.engine.Engine.run`): drained on the fast machine, a SimPy process on the
event machine. Its loop, until every request has finished:

1. arrivals up to now join the queue (open loop: their times; closed loop: a user sends its next
   request `think_s` after its last one finished); nothing to run: the device idles until the
   next arrival;
2. the scheduler plans the step (`sim.serving.scheduler`); with `memory.kv=shared` the expert
   cache is resized to what the KV leaves (`Ledger.resize_cache`);
3. the step runs on the engine: a lone decode token is the replay's decode step
   (`sim/engine/step.py: decode_layer`, the fast machine's inline copy), a lone whole prompt the
   replay's prefill, anything else `batch_layer` per MoE layer (after the draft model's time
   when it verifies speculative tokens);
4. the scheduler books its tokens at the step's end; finished requests are recorded.

So `workload.kind=closed workload.users=1 workload.order=trace` with zero think time runs the
replay's steps in the replay's order, and reproduces its per-token times exactly (a test).
"""

from __future__ import annotations

import heapq

from sim.engine.engine import gc_paused
from sim.engine.fast import FastMachine
from sim.engine.fast import decode_token as fast_decode_token
from sim.engine.fast_batch import fast_batch_layer
from sim.engine.step import BatchTally, Pending, batch_layer
from sim.machine.cost import OpWork
from sim.serving.kv import KvBudget
from sim.serving.metrics import RequestRecord, StepRecord
from sim.serving.scheduler import Live, Scheduler, SpecOptions, Work
from sim.serving.workload import Request, WorkloadOptions


class Serving:
    def __init__(self, engine, requests: list[Request], workload: WorkloadOptions, scheduler: Scheduler,
                 kv: KvBudget, spec: SpecOptions):
        self.e, self.requests, self.wl, self.sched, self.kv, self.spec = engine, requests, workload, scheduler, kv, spec
        self.records: list[RequestRecord] = []
        self.steps: list[StepRecord] = []
        self._arrivals: list[tuple[float, int, Live]] = []  # (time, rid, request) to come, a heap
        self._unsent = 0  # closed loop: the next request a user sends

    # ------------------------------------------------------------------ arrivals
    def _arrive_at(self, t_s: float, req: Request, user: int) -> None:
        req.user = user
        heapq.heappush(self._arrivals, (t_s, req.rid, Live(req, t_s)))

    def _start_arrivals(self) -> None:
        if self.wl.kind == "open":
            for req in self.requests:
                self._arrive_at(float(req.arrival_s), req, -1)
            self._unsent = len(self.requests)
        else:
            for user in range(min(self.wl.users, len(self.requests))):
                self._arrive_at(0.0, self.requests[user], user)
            self._unsent = min(self.wl.users, len(self.requests))

    def _finished(self, live: Live, end_s: float) -> None:
        req = live.req
        self.records.append(RequestRecord(
            rid=req.rid, seq=req.seq, user=req.user, arrival_s=live.arrival_s, admitted_s=live.admitted_s,
            first_token_s=live.token_times_s[0] if live.token_times_s else None, finish_s=end_s,
            token_times_s=list(live.token_times_s), prompt_tokens=len(req.prompt_rows),
            output_tokens=len(live.token_times_s), preemptions=live.preemptions))
        if self.wl.kind == "closed" and self._unsent < len(self.requests):  # its user sends the next one
            self._arrive_at(end_s + self.wl.think_s, self.requests[self._unsent], req.user)
            self._unsent += 1

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        e = self.e
        e.warm_start()
        with gc_paused():
            if isinstance(e.machine, FastMachine):
                for _ in self.process():
                    raise AssertionError("a step yielded an event on a machine that computes every time at once")
            else:
                e.machine.run(self.process())
        e.machine.finish()
        e.finish()

    def process(self):
        e, m, sched, kv = self.e, self.e.machine, self.sched, self.kv
        self._start_arrivals()
        n = len(self.requests)
        empty = 0
        while len(self.records) < n:
            while self._arrivals and self._arrivals[0][0] <= m.now:
                sched.arrive(heapq.heappop(self._arrivals)[2])
            if sched.idle:
                r = m.idle_until(self._arrivals[0][0])
                if r.__class__ is Pending:
                    yield r.event
                e.t_end = m.now
                continue
            work = sched.plan(m.now)
            if not work:  # the plan only preempted (a step that preempts admits no one): plan again
                empty += 1
                assert empty < 2, "the scheduler planned two empty steps in a row with requests waiting"
                continue
            empty = 0
            if kv.shared:
                e.ledger.resize_cache(kv.expert_cache_bytes(), work[0].rows[0])
            start, loads0 = m.now, len(e.rec.loads)
            kv_bytes, cache_bytes = kv.used_bytes, kv.expert_cache_bytes()  # held during the step
            union = yield from self._step(work)
            end = m.token_done()
            e.t_end = end
            for live in sched.complete(work, end):
                self._finished(live, end)
            if kv.shared:
                e.ledger.resize_cache(kv.expert_cache_bytes(), work[0].rows[0])
            dec = sum(len(w.rows) for w in work if w.kind != "prefill")
            self.steps.append(StepRecord(
                start_s=start, end_s=end, requests=len(work), decode_tokens=dec,
                prefill_tokens=sum(len(w.rows) for w in work) - dec, union_experts=union / e.L,
                bytes_loaded=e.rec.loads.nbytes_since(loads0), kv_bytes=kv_bytes, expert_cache_bytes=cache_bytes))

    def _step(self, work: list[Work]):
        """Run one planned step on the engine; returns the experts it ran, summed over layers."""
        e = self.e
        t = work[0].rows[0]
        if len(work) == 1 and work[0].kind == "decode" and work[0].context == int(e.ctx.trace.pos[t]):
            # the replay's decode step (its attention at the trace's position: the KV held, uncapped)
            if isinstance(e.machine, FastMachine) and e.decode_inline:
                fast_decode_token(e, t, False)
            else:
                yield from e._decode(t, False)
            if e.plan is not None:
                return int(e._n[t].sum())
            return int(e.rec.tokens["experts_run"][-1])
        live = work[0].live
        if len(work) == 1 and work[0].kind == "prefill" and len(work[0].rows) == len(live.prefill_rows):
            tally = BatchTally()
            yield from e._prefill(work[0].rows, tally)
            return tally.union
        if any(w.kind == "verify" for w in work) and self.spec.draft_s:  # the draft model proposes k tokens
            r = e.machine.run_op(OpWork(self.spec.k * self.spec.draft_s, 0.0, 0.0))
            if r.__class__ is Pending:
                yield r.event
        rows = [t for w in work for t in w.rows]
        pairs = [(w.context, len(w.rows)) for w in work]
        decode_rows = [t for w in work if w.kind != "prefill" for t in w.rows]
        tally = BatchTally()
        union = e.batch_union(rows, bool(decode_rows) and not e.placement.always_load)
        if isinstance(e.machine, FastMachine) and e.batch_inline and e.machine.inline_batch:
            for layer in range(e.L):  # the fast machine's hot path, written out (`sim.engine.fast_batch`)
                fast_batch_layer(e, layer, rows, pairs, decode_rows, tally,
                                 None if union is None else (union[0], union[1], union[2][layer]))
            return tally.union
        for layer in range(e.L):
            yield from batch_layer(e, layer, rows, pairs, decode_rows, tally,
                                   None if union is None else (union[0], union[1], union[2][layer]))
        return tally.union



