"""One forward step per MoE layer, written once, executed by every machine (DESIGN 12).

A *step* is what happens at one MoE layer of a decode token (`decode_layer`) or of a prompt's
prefill batch (`prefill_layer`). The description below decides everything (gating, where each
active expert is, which loads to issue, in what order to compute) and keeps the books through
the run's `Ledger`; a *machine* executes the parts where time passes:

    machine                    where it runs                 time
    sim.engine.fast            the simulator, one issuer     simulated, computed at once (no events)
    sim.engine.events          the simulator, SimPy actors   simulated, a SimPy process per op
    sim.realrun.machine        the real run                  wall clock, real kernels and copies

The steps are generator functions. A machine's operation returns its result at once (the fast
machine computes the time it took; the real one blocks until the kernel or the copy is done), or a
`Pending` holding a SimPy event, which the step yields; the step then runs as a SimPy process and
the event's value is the result. So under the fast and the real machines a step never yields (its
generator runs to its end in one call), and under SimPy it is an ordinary process.

Per decode token t and MoE layer l (DESIGN 4):
  1. non-expert work (attention, norms, router) on the compute stream;
  2. the loads that ended by now are applied; gating picks the active experts (the plan when the
     gating policy is stateless); they are pinned for the step; a cache policy that sets
     `observes_steps` is told the step's rows (`CachePolicy.on_step`);
  3. each active expert: resident -> ready; loading -> wait for that same transfer (a hit if it
     has arrived); absent -> the placement policy: a demand load (priority 0) into a cache slot or
     a staging buffer, a low-precision copy into a staging buffer, or the CPU worker;
  4. the prefetch policy's loads (priority 1) for later layers, after the demand loads;
  5. (AdapMoE) the layer waits for its in-flight prefetches, used or not;
  6. compute: resident experts first, then loaded ones in the order they arrive; then the CPU
     worker's; the step ends when both streams are done;
  7. staged prefetches aimed at this layer that it did not use are dropped; counters.
A demand load that finds every channel busy cuts the running prefetch that frees a channel
soonest at its next chunk boundary, if the prefetch policy issues chunks (never one this layer
needs). Prefill runs one batch per layer over the prompt: the union of its experts, each computed
once on its tokens, resident ones first, then loads with at most `staging_buffers` outstanding,
computed in issue order; the prefetch policy is asked `on_prefill` once per layer, once the
layer's loads are all issued, only if it sets `prefetches_in_prefill` (a policy that does not is
simulated as if prefill had no prefetch hook). In such a
prefill the loads already in flight (its prefetches) come first, and staged prefetches the layer
does not run are dropped before its loads, so that every staging buffer held is one of the
`staging_buffers` outstanding. A serving run's batched
step (`batch_layer`, docs/serving.md) is the same over several requests' tokens, with each
request's attention context and the prefetch policy told of the step's decode tokens; a prompt's
prefill is `batch_layer` with one request.
"""

from __future__ import annotations

from policies.base import CPU, LOAD
from sim.engine.cache import ABSENT, RESIDENT
from sim.engine.transfer import DEMAND, PREFETCH


class Pending:
    """An operation that takes simulated time under SimPy: the step yields `event`."""

    __slots__ = ("event",)

    def __init__(self, event):
        self.event = event


class Tally:
    """The counters of one decode token, filled by its layers' steps."""

    __slots__ = ("demand", "needed", "hits", "single", "dL", "stall_s", "cpu_wait_s")

    def __init__(self) -> None:
        self.demand = self.needed = self.hits = self.single = 0
        self.dL = self.stall_s = self.cpu_wait_s = 0.0


def load(e, key: int, priority: int, t: int, layer: int, nbytes: float | None = None, staging: bool = False):
    """Issue a load of expert `key` at step (t, layer); None if a prefetch finds no room.

    `staging=True` loads into a staging buffer instead of a cache slot (AdapMoE's prefetches,
    low-precision copies); a demand load that gets no slot goes there too."""
    m, ledger = e.machine, e.ledger
    if nbytes is None:
        nbytes = e.expert_bytes
    full = priority == PREFETCH and e.prefetch.idle_only and m.link_full()  # asked only when it matters
    where = ledger.admit(key, priority, t, layer, nbytes, staging, full)
    if where is None:
        return None
    if priority == DEMAND and e.yield_chunk_bytes:
        m.cut_a_prefetch(ledger.cache.pinned, e.yield_chunk_bytes)
    tr = m.issue(key, nbytes, priority, where, t, layer)
    ledger.issued(tr)
    return tr


def decode_layer(e, t: int, layer: int, pos: int, rec_ops: bool, tally: Tally, keys: list[int], ws: list[float],
                 dL: float):
    """Layer `layer` of decode token `t` at context `pos` with the gating's decision (`keys` of the
    experts that run, their weights `ws`, its `dL`): the module docstring's steps 1-7. Returns the
    machine's combined expert outputs (the real run's; None when simulated).

    Each step is a named generator below; the fast machine runs an inline copy of all of them
    (`sim.engine.fast.decode_token`, its hot path), which `tests/test_machines.py` checks against
    this one."""
    m, ledger = e.machine, e.ledger
    gate_s = yield from _attend(e, t, layer, pos, rec_ops)  # 1.
    ledger.cache.pinned.update(keys)  # 2.
    cache_policy = e.cache_policy
    if cache_policy.observes_steps:  # the step's row, once the layer has gated, before its loads
        cache_policy.on_step([t], layer)
    ready, waiting, cpu_keys, hits, dL = yield from _classify(e, t, layer, keys, ws, dL, tally, gate_s)  # 3.
    if cpu_keys:  # the CPU worker starts now, beside the device's work below
        m.cpu_start(cpu_keys, [ws[keys.index(k)] for k in cpu_keys], gate_s, None, t, layer)
        e.rec.per_layer["cpu_experts"][layer] += len(cpu_keys)
    _prefetch(e, t, layer)  # 4.
    pending = ledger.by_target.pop(layer, None) if ledger.by_target else None
    if pending and e.prefetch.wait_for_prefetch:  # 5.
        yield from _wait_for(e, layer, pending, tally)
    outs = yield from _compute(e, t, layer, keys, ws, ready, waiting, cpu_keys, tally, rec_ops)  # 6.
    if pending and ledger.prefetch_staging:  # 7.
        ledger.drop_unused_staged(pending, layer)
    _count(e, layer, keys, hits, dL, tally)
    return m.combine(outs) if outs is not None else None


def _attend(e, t: int, layer: int, pos: int, rec_ops: bool):
    """Step 1: the layer's non-expert work, then what has arrived by now. Returns the gate time."""
    m = e.machine
    a0 = m.now
    r = m.attention(layer, pos, 1)
    if r.__class__ is Pending:
        yield r.event
    if rec_ops:
        e.rec.op("compute", t, layer, "attention", a0, m.now)
    gate_s = m.now
    r = m.settle()
    if r.__class__ is Pending:
        yield r.event
    return gate_s


def _classify(e, t: int, layer: int, keys: list[int], ws: list[float], dL: float, tally: Tally, gate_s: float):
    """Step 3: where each active expert is. Returns (resident keys, transfers to wait for, keys for
    the CPU or None, hits, dL with the low-precision copies' estimate added); issues the demand loads."""
    m, ledger, rec = e.machine, e.ledger, e.rec
    state, inflight, unused = ledger.cache.state, ledger.inflight, ledger.unused
    ready: list[int] = []
    waiting: list = []
    cpu_keys = None
    hits = 0
    for j, key in enumerate(keys):
        tr = inflight.get(key)
        if tr is not None and (tr.cancelled or tr.cancel_requested):  # a prefetch cut for a demand load
            r = m.wait_ended(tr)  # until it has stopped: its data is of no use; the expert is absent then
            if r.__class__ is Pending:
                r = yield r.event
            tally.stall_s += r
            rec.per_layer["stall_s"][layer] += r
            tr = inflight.get(key)
        if tr is None:
            if state[key] == RESIDENT:
                ready.append(key)
                hits += 1
                if key in unused:  # a prefetch that arrived in time
                    unused.discard(key)
                    rec.per_layer["prefetch_used"][layer] += 1
                continue
            placement = e.placement
            if placement.always_load or (where := placement.place(key, t, ws[j])) == LOAD:
                waiting.append(load(e, key, DEMAND, t, layer))
            elif where == CPU:
                if cpu_keys is None:
                    cpu_keys = []
                cpu_keys.append(key)
                continue
            else:  # LOW: a low-precision copy into a staging buffer, lossy
                waiting.append(load(e, key, DEMAND, t, layer, placement.low_bytes, True))
                dL += placement.dL(layer, ws[j])
            tally.demand += 1
            rec.per_layer["demand_loads"][layer] += 1
            continue
        if m.arrived(tr, gate_s):  # loading, and arrived: a hit
            hits += 1
            if tr.staging:  # arrived in a staging buffer: computed from it, then released
                waiting.append(tr)
            else:
                ready.append(key)
        else:  # still loading: wait for that same transfer
            waiting.append(tr)
            if key in unused:
                rec.per_layer["prefetch_late"][layer] += 1
        if key in unused:
            unused.discard(key)
            rec.per_layer["prefetch_used"][layer] += 1
    return ready, waiting, cpu_keys, hits, dL


def _prefetch(e, t: int, layer: int, rows: list[int] | None = None, prefill: bool = False) -> None:
    """Step 4: the prefetch policy's loads for later layers, after this layer's demand loads (for
    token t, for the decode tokens `rows` of a batched step, or, `prefill`, for the prompt tokens
    `rows` of a prefill batch, booked at token t)."""
    ledger, prefetch = e.ledger, e.prefetch
    state, inflight = ledger.cache.state, ledger.inflight
    if rows is None:
        keys = prefetch.on_layer(t, layer)
    elif prefill:
        keys = prefetch.on_prefill(rows, layer)
    else:
        keys = prefetch.on_batch(rows, layer)
    into_host = e.prefetch_into_host  # (a tiered run's `prefetch.into=host`: reads into host memory only)
    m = e.machine
    for pk in keys:
        if state[pk] == ABSENT and pk not in inflight:
            if into_host:
                if not m.prefetch_host(pk, t, layer) and prefetch.stop_at_first_skip:
                    break
            elif load(e, pk, PREFETCH, t, layer, None, ledger.prefetch_staging) is None and prefetch.stop_at_first_skip:
                break


def _prefetch_batch(e, layer: int, decode_rows: list[int], keys, prefill_rows: list[int] | None = None,
                    t: int = -1) -> None:
    """A batched step's prefetches (step 4), with the layer's experts `keys` kept meanwhile: for its
    decode tokens, or (`prefill_rows` given) a prefill batch's `on_prefill`, booked at token `t`."""
    pinned = e.ledger.cache.pinned
    pinned.update(keys)
    if prefill_rows is None:
        _prefetch(e, -1, layer, decode_rows)
    else:
        _prefetch(e, t, layer, prefill_rows, True)
    pinned.clear()


def _wait_for(e, layer: int, pending: list, tally: Tally, decode: bool = True):
    """Step 5 (AdapMoE): the layer waits for the in-flight prefetches aimed at it, used or not."""
    m, rec = e.machine, e.rec
    for tr in pending:
        w0 = m.now
        r = m.wait(tr)
        if r.__class__ is Pending:
            r = yield r.event
        if r and m.tiers is not None:
            m.tiers.storage_stall(tr, w0, r, decode)
        tally.stall_s += r
        rec.per_layer["stall_s"][layer] += r


def _compute(e, t: int, layer: int, keys: list[int], ws: list[float], ready: list[int], waiting: list,
             cpu_keys: list[int] | None, tally: Tally, rec_ops: bool):
    """Step 6: resident experts first, then loaded ones in the order they arrive (each released
    once computed), then the CPU worker's. Returns {key: output} (None when simulated)."""
    m, ledger, rec = e.machine, e.ledger, e.rec
    outs = {} if m.needs_weights else None
    on_access = e.cache_policy.on_access
    for key in ready:
        c0 = m.now
        r = m.compute(key, 1, ws[keys.index(key)] if outs is not None else 1.0)
        if r.__class__ is Pending:
            r = yield r.event
        if outs is not None:
            outs[key] = r
        on_access(key, t)
        if rec_ops:
            rec.op("compute", t, layer, f"expert {key % ledger.E}", c0, m.now)
    while waiting:
        w0 = m.now
        tr = m.first_to_arrive(waiting)  # (a machine may wait for it here, or in compute_loaded)
        if tr.__class__ is Pending:
            tr = yield tr.event
        waiting.remove(tr)
        c0 = m.now
        r = m.compute_loaded(tr, 1, ws[keys.index(tr.key)] if outs is not None else 1.0)
        if r.__class__ is Pending:
            r = yield r.event
        if outs is not None:
            outs[tr.key] = r[0]
        stall = (c0 - w0) + r[1]
        if stall:
            if m.tiers is not None:
                m.tiers.storage_stall(tr, w0, stall)
            tally.stall_s += stall
            rec.per_layer["stall_s"][layer] += stall
        if rec_ops:
            rec.op("compute", t, layer, f"expert {tr.key % ledger.E}", c0 + r[1], m.now)
        ledger.released(tr, t, layer)
    if cpu_keys:
        r = m.cpu_wait()
        if r.__class__ is Pending:
            r = yield r.event
        wait_s, cpu_outs, start_s, end_s = r
        tally.cpu_wait_s += wait_s
        if outs is not None:
            outs.update(cpu_outs)
        if rec_ops:
            rec.op("cpu", t, layer, f"{len(cpu_keys)} expert(s)", start_s, end_s)
    return outs


def _count(e, layer: int, keys: list[int], hits: int, dL: float, tally: Tally) -> None:
    """Step 7's counters (the pins are released). What the plan alone decides is counted here only
    when it is not summed from the plan after the run (`e.count_here`)."""
    e.ledger.cache.pinned.clear()
    tally.hits += hits
    pl_ = e.rec.per_layer
    pl_["hits"][layer] += hits
    if e.count_here:
        n = len(keys)
        tally.needed += n
        tally.single += n == 1
        tally.dL += dL
        pl_["needed"][layer] += n
        pl_["experts_run"][layer] += n
        pl_["single_pairs"][layer] += n == 1
        pl_["dL"][layer] += dL


class BatchTally:
    """The counters of one batched step (`batch_layer`), summed over its layers."""

    __slots__ = ("union", "hits", "demand", "stall_s")

    def __init__(self) -> None:
        self.union = self.hits = self.demand = 0
        self.stall_s = 0.0


def prefill_layer(e, prompt: list[int], layer: int, tally: BatchTally | None = None):
    """Layer `layer` of a prompt's prefill: one batch over its tokens (the module docstring)."""
    yield from batch_layer(e, layer, prompt, [(0, len(prompt))], (), tally)


def batch_layer(e, layer: int, rows: list[int], pairs: list[tuple[int, int]], decode_rows, tally: BatchTally | None,
                union: tuple[dict[int, int], dict[int, float] | None, list[int]] | None = None):
    """Layer `layer` of a batched step: the tokens of trace `rows` (prompt chunks, decode and
    verify positions of several requests), attention over each request's (context, new tokens)
    in `pairs`, then (a cache policy that sets `observes_steps` told of all of `rows` once they have
    gated) the union of the rows' experts, each computed once on the tokens it serves:
    resident ones first (most tokens first), then loads with at most `staging_buffers`
    outstanding, each computed once its load is in, in issue order. The prefetch policy is asked
    for each of `decode_rows` after the first loads are issued (with no decode rows: its
    `on_prefill` for `rows`, if it sets `prefetches_in_prefill`, once every load is issued; else nothing), and
    a layer waits for the prefetches aimed at it as in `decode_layer`. With decode rows, an absent expert
    the placement policy puts on the CPU is computed there on its tokens (asked with its largest
    gate weight in the batch), beside the device's work; every other absent expert is loaded (a
    low-precision copy is a batch-1 decode step's). A prompt's prefill (no decode rows) loads
    every expert, as the replay's prefill always has: it is this step with one request.
    `union`: (counts, weights, this layer's ranked keys) from `Engine.batch_union(rows,
    weights=<placement asked>)` when the caller computed it for the whole step (a stateless
    gating; its dicts hold every layer's keys), else the rows are gated here."""
    m, ledger = e.machine, e.ledger
    cache = ledger.cache
    t0 = rows[0]  # the step is booked at its first token
    prefill_hook = not decode_rows and e.prefetch.prefetches_in_prefill  # a prefill batch's prefetches
    count_use = bool(decode_rows) or prefill_hook  # the step keeps the prefetch counters
    a = m.attention(layer, pairs[0][0], pairs[0][1]) if len(pairs) == 1 else m.attention_batch(layer, pairs)
    if a.__class__ is Pending:
        yield a.event
    r = m.settle()  # the loads that ended by now are applied first: a stateful gating reads the cache
    if r.__class__ is Pending:
        yield r.event
    placement = e.placement
    place = decode_rows and not placement.always_load  # a prompt's prefill loads every expert
    if union is not None:
        counts, weight, ranked = union
    else:
        counts: dict[int, int] = {}  # expert -> the rows that run it
        weight: dict[int, float] = {}  # (with a placement to ask) the largest gate weight of each expert
        for t in rows:
            keys, ws, _ = e.decide(t, layer)
            for j, k in enumerate(keys):
                counts[k] = counts.get(k, 0) + 1
                if place and ws[j] > weight.get(k, -1.0):
                    weight[k] = ws[j]
        ranked = sorted(counts, key=lambda k: (-counts[k], k))
    if e.cache_policy.observes_steps:  # the step's rows, once the layer has gated, before its loads
        e.cache_policy.on_step(rows, layer)
    gate_s = m.now
    state = cache.state  # resident experts first, each group by count (most first), then by key
    order = [k for k in ranked if state[k] == RESIDENT] + [k for k in ranked if state[k] != RESIDENT]
    on_access = e.cache_policy.on_access
    cpu_keys: list[int] = []
    if place:  # missed experts the placement runs where they live (the CPU worker, on their tokens)
        for key in order:
            if (cache.state[key] == ABSENT and key not in ledger.inflight
                    and placement.place(key, t0, weight[key]) == CPU):
                cpu_keys.append(key)
        if cpu_keys:
            order = [k for k in order if k not in cpu_keys]
            m.cpu_start(cpu_keys, [weight[k] for k in cpu_keys], gate_s, [counts[k] for k in cpu_keys], t0, layer)
            e.rec.per_layer["cpu_experts"][layer] += len(cpu_keys)
    todo: list[int] = []
    for key in order:
        if cache.state[key] == RESIDENT:
            r = m.compute(key, counts[key], 1.0)
            if r.__class__ is Pending:
                yield r.event
            on_access(key, t0)
            if tally is not None:
                tally.hits += 1
            if count_use and key in ledger.unused:  # a prefetch that arrived in time
                ledger.unused.discard(key)
                e.rec.per_layer["prefetch_used"][layer] += 1
        else:
            todo.append(key)
    if tally is not None:
        tally.union += len(ranked)
    if prefill_hook:  # (a prefill that prefetches) the prefetches of this layer's experts go first, and the
        # staged ones it does not run give their buffers back now: every buffer held is then outstanding
        todo.sort(key=lambda k: k not in ledger.inflight)  # stable
        if ledger.prefetch_staging and ledger.by_target.get(layer):
            ledger.drop_unused_staged([tr for tr in ledger.by_target[layer] if tr.key not in counts], layer)
    # loads: at most `staging_buffers` outstanding; each computed once its load is in, in issue order
    outstanding: list = []
    keep = set(todo)  # the experts still to compute: kept (neither evicted nor cut) for a load
    asked = not decode_rows and not prefill_hook
    while todo or outstanding:
        # (the buffers staged prefetches hold are not the step's: at most staging_buffers - top_k)
        while todo and len(outstanding) < ledger.staging_buffers - ledger.prefetch_staging_held:
            key = todo.pop(0)
            r = m.settle()
            if r.__class__ is Pending:
                yield r.event
            tr = ledger.inflight.get(key)
            if tr is not None and (tr.cancelled or tr.cancel_requested):  # a prefetch cut for a demand load
                r = m.wait_ended(tr)  # until it has stopped: the expert is absent then, and loaded below
                if r.__class__ is Pending:
                    r = yield r.event
                if tally is not None:
                    tally.stall_s += r
                todo.insert(0, key)
                continue
            if tr is not None:  # already on its way (a prefetch from the last token)
                outstanding.append(tr)
                if count_use and key in ledger.unused:
                    ledger.unused.discard(key)
                    e.rec.per_layer["prefetch_used"][layer] += 1
                    e.rec.per_layer["prefetch_late"][layer] += 1
                continue
            if cache.state[key] == RESIDENT:  # arrived meanwhile
                r = m.compute(key, counts[key], 1.0)
                if r.__class__ is Pending:
                    yield r.event
                on_access(key, t0)
                keep.discard(key)
                if count_use and key in ledger.unused:  # a prefetch, used
                    ledger.unused.discard(key)
                    e.rec.per_layer["prefetch_used"][layer] += 1
                continue
            cache.pinned.update(keep)
            cache.pinned.discard(key)  # (a dropped staged prefetch of it may still run: that one may be cut)
            outstanding.append(load(e, key, DEMAND, t0, layer))
            cache.pinned.clear()
            if tally is not None:
                tally.demand += 1
        if not asked and not (prefill_hook and todo):  # the prefetch policy, told of the step's decode
            asked = True  # rows, after the first loads (a prefill's `on_prefill`: once every load is issued)
            _prefetch_batch(e, layer, decode_rows, ranked, rows if prefill_hook else None, t0)
        if not outstanding:  # every key left arrived meanwhile (computed above): nothing to wait for
            continue
        tr = outstanding.pop(0)
        w0 = m.now
        r = m.first_to_arrive([tr])  # in issue order, whatever arrives first
        if r.__class__ is Pending:
            yield r.event
        c0 = m.now
        r = m.compute_loaded(tr, counts[tr.key], 1.0)
        if r.__class__ is Pending:
            r = yield r.event
        stall = (c0 - w0) + r[1]  # (a machine may wait for it in either: the event one waits for its start first)
        if stall and m.tiers is not None:
            m.tiers.storage_stall(tr, w0, stall, False)
        if tally is not None:
            tally.stall_s += stall
        keep.discard(tr.key)
        if tr.staging and tr.priority == PREFETCH:  # its release may adopt it into the cache (AdapMoE's
            r = m.settle()  # admit-on-use): into the cache as of now, never in place of an expert still
            if r.__class__ is Pending:  # to compute
                yield r.event
            cache.pinned.update(keep)
            ledger.released(tr, t0, layer)
            cache.pinned.clear()
        else:
            ledger.released(tr, t0, layer)
    if not asked:
        _prefetch_batch(e, layer, decode_rows, ranked, rows if prefill_hook else None, t0)
    if cpu_keys:
        r = m.cpu_wait()
        if r.__class__ is Pending:
            r = yield r.event
        if tally is not None:
            tally.stall_s += r[0]
    if count_use:  # AdapMoE: the prefetches aimed at this layer, waited for and dropped as in `decode_layer`
        pending = ledger.by_target.pop(layer, None) if ledger.by_target else None
        if pending and e.prefetch.wait_for_prefetch:
            stall = Tally()
            yield from _wait_for(e, layer, pending, stall, False)
            if tally is not None:
                tally.stall_s += stall.stall_s
        if pending and ledger.prefetch_staging:
            ledger.drop_unused_staged(pending, layer)
