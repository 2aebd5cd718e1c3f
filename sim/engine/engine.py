"""The engine: replays a trace's steps on a machine under policies (DESIGN 4 and 12).

An `Engine` holds one run: the policies, the `Ledger` (where every expert is, what every load is
for), the `Recorder`, and a machine that executes the steps of `sim/engine/step.py` in time: the
fast machine (`sim/engine/fast.py`, the default: one issuer, no events) or the SimPy one
(`sim/engine/events.py`: links, compute stream and CPU worker as SimPy actors; `machine="events"`).
The replay order is `sim.engine.replay.replay_steps`: each sequence's prefill (one batch per
layer), then its decode tokens one by one.

Per-token and per-layer figures are counted by the steps; the bytes a token loaded are those its
loads really moved (a prefetch cut short counts for the part moved), summed from the load log at
the end of the run.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from policies.base import Context, GatingPolicy, PlacementPolicy, PrefetchPolicy
from sim.engine.cache import ExpertCache
from sim.engine.fast import FastMachine
from sim.engine.fast import decode_token as fast_decode_token
from sim.engine.ledger import Ledger
from sim.engine.link import CopyLink
from sim.engine.recorder import Recorder
from sim.engine.replay import replay_steps
from sim.engine.step import Tally, decode_layer, prefill_layer
from sim.machine.cost import CostModel


@contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector during a run. A run allocates a Transfer per load
    but creates no reference cycles, so the collections that the allocations trigger find nothing
    and cost a few percent of the run (`python -m sim bench`)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class EngineOptions:
    pipelining: bool = False  # per-matrix pipelining: each of an expert's 3 GEMMs starts when its matrix is in
    prefill: bool = True  # simulate each prompt's prefill (gives TTFT)
    staging_buffers: int | None = None  # transient buffers for demand loads that take no cache slot (default: max(6, 2 x top-k); top-k are kept for demand loads)
    timeline_tokens: int = 16  # compute ops are recorded for the first N decode tokens (report timeline)
    max_tokens: int = 0  # simulate at most this many decode tokens (0: all)


MACHINES = ("fast", "events")


def _drain(step) -> None:
    """Run a step on a machine that never waits (the fast one)."""
    for _ in step:
        raise AssertionError("a step yielded an event on a machine that computes every time at once")


class Engine:
    def __init__(self, ctx: Context, cost: CostModel, gating: GatingPolicy, prefetch: PrefetchPolicy,
                 cache_policy, placement: PlacementPolicy, link: CopyLink, options: EngineOptions,
                 machine: str = "fast"):
        if machine not in MACHINES:
            raise ValueError(f"machine must be one of {MACHINES}, got {machine!r}")
        self.ctx, self.cost, self.opt = ctx, cost, options
        self.gating, self.prefetch, self.cache_policy, self.placement = gating, prefetch, cache_policy, placement
        self.cache: ExpertCache = ctx.cache
        self.L, self.E = ctx.layers, ctx.experts
        self.link = link
        self.rec = Recorder(self.L)
        self.expert_bytes = cost.expert_bytes
        self.yield_chunk_bytes = float(prefetch.yield_chunk_bytes or 0.0)
        self.ledger = Ledger(self.cache, cache_policy, prefetch, self.E, cost.expert_bytes,
                             options.staging_buffers, self.rec, demand_reserve=ctx.top_k)
        if machine == "fast":
            self.set_machine(FastMachine(cost, link, options.pipelining))
        else:
            from sim.engine.events import EventMachine

            self.set_machine(EventMachine(cost, link, options.pipelining))
        self.decoded: list[int] = []  # trace indices of the decoded tokens, in order
        self._plan(ctx.gating_plan if ctx.gating_plan is not None else gating.plan())
        #: the steps count experts run, single-expert pairs and dL themselves, unless the plan alone
        #: decides them (a stateless gating, every expert loaded): then they are summed from it after
        #: the run (`_counts_from_plan`), off the hot path
        self.count_here = self.plan is None or not placement.always_load
        #: the fast machine runs decode tokens with its inline loop (`sim.engine.fast.decode_token`);
        #: False: layer by layer with the generic step, as the other machines do (a test compares them)
        self.decode_inline = True
        #: the fast machine runs a serving run's batched steps with `sim.engine.fast_batch.fast_batch_layer`
        #: where it applies (`FastMachine.inline_batch`); False: the generic `batch_layer` (a test compares them)
        self.batch_inline = True
        self.t_end = 0.0  # when the last prefill or decode token ended: the next one starts there
        #: (a tiered run's `prefetch.into=host`) the prefetch policy's keys are read into host memory only
        self.prefetch_into_host = False

    def set_machine(self, machine) -> None:
        """Execute the steps on `machine` (the simulator's two, or the real run's `RealMachine`)."""
        self.machine = machine
        machine.attach(self.ledger)
        self.ledger.machine = machine
        self.ledger.notify = machine.holds_memory

    # ------------------------------------------------------------------ gating
    def _plan(self, plan) -> None:
        """The stateless gating's decisions as arrays; a token's rows become lists when it runs."""
        self.plan = plan
        if plan is None:
            return
        L, E = self.L, self.E
        ids = np.asarray(plan.ids)
        self._keys = np.where(ids >= 0, ids + (np.arange(L) * E)[None, :, None], -1).astype(np.int32)  # [T, L, k]
        self._n = (ids >= 0).sum(-1).astype(np.int32)  # [T, L] experts run (the kept ones come first)
        self._w = np.asarray(plan.weights, dtype=np.float64)  # [T, L, k]
        self._dL = np.asarray(plan.dL, dtype=np.float64)  # [T, L]
        self._rows: dict[int, tuple] = {}  # token -> its decisions as lists (`decide`)

    def decide(self, t: int, layer: int) -> tuple[list[int], list[float], float]:
        """(keys of the experts that run, their weights, dL) of token t at `layer`."""
        if self.plan is None:
            ids, ws, dL = self.gating.decide(t, layer)
            base = layer * self.E
            return [base + e for e in ids if e >= 0], ws, dL
        row = self._rows.get(t)
        if row is None:  # this token's decisions as lists, kept while its step (or batch) runs
            if len(self._rows) >= 4096:  # more than a step holds (batch.max_tokens)
                self._rows.clear()
            row = self._rows[t] = (self._keys[t].tolist(), self._w[t].tolist(), self._dL[t].tolist(),
                                   self._n[t].tolist())
        keys, w, dL, n = row
        k = n[layer]
        return keys[layer][:k], w[layer][:k], dL[layer]

    def batch_union(self, rows: list[int], weights: bool) -> tuple[dict, dict | None, list[list[int]]] | None:
        """The union of the experts that the tokens `rows` run in a batched step, from the plan in
        one pass over the step: ({key: how many of the rows run it}, with `weights` {key: its
        largest gate weight among them}, per MoE layer its keys by count, most first, then by key).
        Keys are global (`layer * E + expert`), so the two dicts serve every layer; a row twice in
        `rows` counts twice. None for a stateful gating: `batch_layer` then asks `decide` layer by
        layer, after the loads that ended by then (the same counts when the plan exists)."""
        if self.plan is None:
            return None
        L, E = self.L, self.E
        flat = self._keys[rows].ravel()  # [B * L * k] keys, -1 where no expert runs
        ran = flat >= 0
        flat = flat[ran]
        count = np.bincount(flat, minlength=L * E)  # [L * E]
        keys = np.flatnonzero(count)  # ascending: layer by layer
        n = count[keys]
        bounds = np.searchsorted(keys, np.arange(L + 1) * E).tolist()  # [L + 1]
        ranked = keys[np.lexsort((keys, -n, keys // E))].tolist()  # by layer, count (most first), key
        kl = keys.tolist()
        counts = dict(zip(kl, n.tolist(), strict=True))
        top = None
        if weights:
            w = np.full(L * E, -1.0)
            np.maximum.at(w, flat, self._w[rows].ravel()[ran])
            top = dict(zip(kl, w[keys].tolist(), strict=True))
        return counts, top, [ranked[bounds[layer]:bounds[layer + 1]] for layer in range(L)]

    # ------------------------------------------------------------------ the run
    def warm_start(self) -> None:
        """The cache policy's initial residents, in place before the clock starts."""
        keys = list(self.cache_policy.warm_start())
        for key in keys:
            self.cache.insert_resident(key, self.expert_bytes)
            self.cache_policy.on_insert(key, -1)
        self.machine.warm(keys)
        self.t_end = self.machine.now

    def run(self) -> Recorder:
        self.warm_start()
        opt = self.opt
        steps = replay_steps(self.ctx.trace, opt.prefill, opt.max_tokens, opt.timeline_tokens)
        with gc_paused():
            if isinstance(self.machine, FastMachine):
                for step in steps:
                    if step[0] == "prefill":
                        _drain(self._prefill(step[1]))
                    elif self.decode_inline:
                        fast_decode_token(self, step[1], step[2])
                    else:
                        _drain(self._decode(step[1], step[2]))
            else:
                self.machine.run(self._event_process(steps))
        self.machine.finish()
        return self.finish()

    def finish(self) -> Recorder:
        """The books once every step has run and every copy ended (the machine's `finish`)."""
        self.ledger.finish()
        if not self.count_here:
            self._counts_from_plan()
        moved = self.rec.loads.moved_by_token()
        self.rec.tokens["bytes_loaded"] = [moved.get(t, 0.0) for t in self.decoded]
        return self.rec

    def _event_process(self, steps):
        """The replay as one SimPy process (the event machine's)."""
        for step in steps:
            if step[0] == "prefill":
                yield from self._prefill(step[1])
            else:
                yield from self._decode(step[1], step[2])

    def _decode(self, t: int, rec_ops: bool):
        """A decode token: its layers' steps, then its row of counters (a generator, as the steps)."""
        tally = Tally()
        pos = int(self.ctx.trace.pos[t])
        if self.plan is not None:  # this token's decisions as lists, sliced per layer
            keys, w, dL, n = self._keys[t].tolist(), self._w[t].tolist(), self._dL[t].tolist(), self._n[t].tolist()
            for layer in range(self.L):
                k = n[layer]
                yield from decode_layer(self, t, layer, pos, rec_ops, tally, keys[layer][:k], w[layer][:k], dL[layer])
        else:
            for layer in range(self.L):
                yield from decode_layer(self, t, layer, pos, rec_ops, tally, *self.decide(t, layer))
        self.token_end(t, tally)

    def token_end(self, t: int, tally: Tally) -> None:
        """Decode token `t` has run every layer: its row of counters. It started where the last
        token (or prefill) ended; it ends when the machine has done its work (`token_done`)."""
        end = self.machine.token_done()
        self.decoded.append(t)
        tr = self.ctx.trace
        row = self.rec.tokens
        row["seq"].append(int(tr.seq[t]))
        row["pos"].append(int(tr.pos[t]))
        row["start_s"].append(self.t_end)
        row["end_s"].append(end)
        self.t_end = end
        row["stall_s"].append(tally.stall_s)
        row["cpu_wait_s"].append(tally.cpu_wait_s)
        row["demand_loads"].append(tally.demand)
        row["hits"].append(tally.hits)
        if self.count_here:
            row["needed"].append(tally.needed)
            row["experts_run"].append(tally.needed)
            row["single_pairs"].append(tally.single)
            row["dL"].append(tally.dL)

    def run_now(self, step):
        """Run one step (a generator from `sim.engine.step`) on a machine that never waits (the fast
        or the real one) and return its value: a live model drives its layers one by one."""
        try:
            while True:
                next(step)
                raise AssertionError("a step yielded an event on a machine whose operations return at once")
        except StopIteration as done:
            return done.value

    def _counts_from_plan(self) -> None:
        """Per-token and per-layer experts run, single-expert pairs and dL of the decoded tokens,
        from the gating plan (with `always_load` placement nothing at run time changes them).
        Sums run in token and layer order (cumsum), as the steps would add them."""
        rows = np.asarray(self.decoded, dtype=np.int64)
        n = self._n[rows].astype(np.int64)  # [tokens, L] experts run
        single = (n == 1).astype(np.int64)
        dL = self._dL[rows]  # [tokens, L]
        tok, pl_ = self.rec.tokens, self.rec.per_layer
        tok["needed"] = n.sum(1).tolist()
        tok["experts_run"] = list(tok["needed"])
        tok["single_pairs"] = single.sum(1).tolist()
        tok["dL"] = (np.cumsum(dL, axis=1)[:, -1] if len(rows) else np.zeros(0)).tolist()
        for name, per_layer in (("needed", n), ("experts_run", n), ("single_pairs", single)):
            pl_[name] = (np.asarray(pl_[name]) + per_layer.sum(0)).tolist()
        if len(rows):
            pl_["dL"] = np.cumsum(np.vstack([np.asarray(pl_["dL"])[None, :], dL]), axis=0)[-1].tolist()

    def _prefill(self, prompt: list[int], tally=None):
        """A prompt's prefill: one batch per layer (a generator, as the steps); `tally`: a
        `sim.engine.step.BatchTally` to count its experts in (serving)."""
        m = self.machine
        for layer in range(self.L):
            yield from prefill_layer(self, prompt, layer, tally)
        end = m.token_done()
        pf = self.rec.prefill
        pf["seq"].append(int(self.ctx.trace.seq[prompt[0]]))
        pf["tokens"].append(len(prompt))
        pf["start_s"].append(self.t_end)
        pf["end_s"].append(end)
        self.t_end = end

    # ------------------------------------------------------------------ what the summary reads
    @property
    def t(self) -> float:
        """The compute stream's clock: the end of the run once it has run."""
        return self.machine.now

    @property
    def compute_busy_s(self) -> float:
        return self.machine.compute_busy_s

    @property
    def prefetch_skipped(self) -> int:
        return self.ledger.prefetch_skipped

    @property
    def prefetch_cancelled(self) -> int:
        return self.ledger.prefetch_cancelled
