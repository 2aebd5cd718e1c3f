"""A serving run's batched step on the fast machine, inline: `sim/engine/step.py`'s `batch_layer`
with the fast machine's operations written out (its hot path; `python -m sim bench serving=N`).

Inlining kept for speed, marked here once: the step's order and bookkeeping are `batch_layer`'s,
line for line; what is written out are the fast machine's `settle`, `compute`, `first_to_arrive`
and `compute_loaded` for its common case (no per-matrix pipelining, copies that do not share the
device's memory bandwidth, no host tier: `FastMachine.inline_batch`). Everything a load changes
is still booked by the shared `step.load` and `Ledger`. `tests/test_machines.py` checks this step
gives the generic one's summary and per-request metrics on random serving runs, and that both
give the SimPy machine's.
"""

from __future__ import annotations

from policies.base import CPU
from sim.engine.cache import ABSENT, RESIDENT
from sim.engine.step import BatchTally, Tally, _prefetch_batch, _wait_for, load
from sim.engine.transfer import DEMAND, PREFETCH


def fast_batch_layer(e, layer: int, rows: list[int], pairs: list[tuple[int, int]], decode_rows,
                     tally: BatchTally | None, union=None) -> None:
    """`batch_layer` on the fast machine (module docstring); same arguments, nothing to yield."""
    m, ledger = e.machine, e.ledger
    cache = ledger.cache
    link = m.link
    heap, advance = link.running_heap, link.advance
    t0 = rows[0]
    prefill_hook = not decode_rows and e.prefetch.prefetches_in_prefill
    count_use = bool(decode_rows) or prefill_hook
    if len(pairs) == 1:
        m.attention(layer, pairs[0][0], pairs[0][1])
    else:
        m.attention_batch(layer, pairs)
    # (`attention` settles: the loads that ended by now are applied)
    placement = e.placement
    place = decode_rows and not placement.always_load
    if union is not None:
        counts, weight, ranked = union
    else:
        counts: dict[int, int] = {}
        weight: dict[int, float] = {}
        for t in rows:
            keys, ws, _ = e.decide(t, layer)
            for j, k in enumerate(keys):
                counts[k] = counts.get(k, 0) + 1
                if place and ws[j] > weight.get(k, -1.0):
                    weight[k] = ws[j]
        ranked = sorted(counts, key=lambda k: (-counts[k], k))
    if e.cache_policy.observes_steps:
        e.cache_policy.on_step(rows, layer)
    gate_s = m.now
    state = cache.state
    order = [k for k in ranked if state[k] == RESIDENT] + [k for k in ranked if state[k] != RESIDENT]
    on_access = e.cache_policy.on_access
    unused, inflight, p_used = ledger.unused, ledger.inflight, e.rec.per_layer["prefetch_used"]
    expert_s_of = m._expert_s
    cpu_keys: list[int] = []
    if place:
        for key in order:
            if state[key] == ABSENT and key not in inflight and placement.place(key, t0, weight[key]) == CPU:
                cpu_keys.append(key)
        if cpu_keys:
            order = [k for k in order if k not in cpu_keys]
            m.cpu_start(cpu_keys, [weight[k] for k in cpu_keys], gate_s, [counts[k] for k in cpu_keys], t0, layer)
            e.rec.per_layer["cpu_experts"][layer] += len(cpu_keys)
    todo: list[int] = []
    for key in order:
        if state[key] == RESIDENT:  # `FastMachine.compute`, inline
            d = expert_s_of(m.now, counts[key])
            m.now += d
            m.compute_busy_s += d
            if heap and heap[0][0] <= m.now:
                advance(m.now)
            on_access(key, t0)
            if tally is not None:
                tally.hits += 1
            if count_use and key in unused:
                unused.discard(key)
                p_used[layer] += 1
        else:
            todo.append(key)
    if tally is not None:
        tally.union += len(ranked)
    if prefill_hook:
        todo.sort(key=lambda k: k not in inflight)
        if ledger.prefetch_staging and ledger.by_target.get(layer):
            ledger.drop_unused_staged([tr for tr in ledger.by_target[layer] if tr.key not in counts], layer)
    outstanding: list = []
    keep = set(todo)
    asked = not decode_rows and not prefill_hook
    pinned = cache.pinned
    while todo or outstanding:
        while todo and len(outstanding) < ledger.staging_buffers - ledger.prefetch_staging_held:
            key = todo.pop(0)
            if heap and heap[0][0] <= m.now:  # `settle`
                advance(m.now)
            tr = inflight.get(key)
            if tr is not None and (tr.cancelled or tr.cancel_requested):
                r = m.wait_ended(tr)
                if tally is not None:
                    tally.stall_s += r
                todo.insert(0, key)
                continue
            if tr is not None:
                outstanding.append(tr)
                if count_use and key in unused:
                    unused.discard(key)
                    p_used[layer] += 1
                    e.rec.per_layer["prefetch_late"][layer] += 1
                continue
            if state[key] == RESIDENT:
                d = expert_s_of(m.now, counts[key])
                m.now += d
                m.compute_busy_s += d
                if heap and heap[0][0] <= m.now:
                    advance(m.now)
                on_access(key, t0)
                keep.discard(key)
                if count_use and key in unused:
                    unused.discard(key)
                    p_used[layer] += 1
                continue
            pinned.update(keep)
            pinned.discard(key)
            outstanding.append(load(e, key, DEMAND, t0, layer))
            pinned.clear()
            if tally is not None:
                tally.demand += 1
        if not asked and not (prefill_hook and todo):
            asked = True
            _prefetch_batch(e, layer, decode_rows, ranked, rows if prefill_hook else None, t0)
        if not outstanding:
            continue
        tr = outstanding.pop(0)
        if tr.start_s < 0.0:  # `first_to_arrive`: queued, look ahead until it is on a channel
            link.wait_started(tr)
        now = m.now  # `compute_loaded` without pipelining
        stall = 0.0
        if tr.done_s > now:
            stall = tr.done_s - now
            now = tr.done_s
        d = expert_s_of(now, counts[tr.key])
        m.now = now + d
        m.compute_busy_s += d
        if heap and heap[0][0] <= m.now:
            advance(m.now)
        if tally is not None:
            tally.stall_s += stall
        keep.discard(tr.key)
        if tr.staging and tr.priority == PREFETCH:
            pinned.update(keep)  # (`settle` ran just above)
            ledger.released(tr, t0, layer)
            pinned.clear()
        else:
            ledger.released(tr, t0, layer)
    if not asked:
        _prefetch_batch(e, layer, decode_rows, ranked, rows if prefill_hook else None, t0)
    if cpu_keys:
        r = m.cpu_wait()
        if tally is not None:
            tally.stall_s += r[0]
    if count_use:
        pending = ledger.by_target.pop(layer, None) if ledger.by_target else None
        if pending and e.prefetch.wait_for_prefetch:
            stall = Tally()
            for _ in _wait_for(e, layer, pending, stall, False):
                raise AssertionError("the fast machine never yields")
            if tally is not None:
                tally.stall_s += stall.stall_s
        if pending and ledger.prefetch_staging:
            ledger.drop_unused_staged(pending, layer)
