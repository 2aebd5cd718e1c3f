"""The fast machine and the SimPy event machine execute the same steps with the same result.

`run` and `sweep` use the fast machine (one issuer, no events, `sim/engine/fast.py`); the event
machine (`sim/engine/events.py`) runs every step as a SimPy process beside link, compute-stream
and CPU-worker actors. On random configurations of every policy preset (1-3 channels, shared and
separate memory, pipelining, prefill, one or two sequences) their per-token latencies, load
timelines and summaries agree to 1e-9, and their counters exactly. The fast machine also runs the
generic step (`decode_layer`) instead of its inline token loop, with the same result.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from policies.presets import PRESETS
from sim.engine import engine as engine_mod
from sim.errors import UserError
from sim.runner import build_engine, simulate
from sim.trace.synthetic import random_trace
from tests.engine_helpers import config, hw, preset

#: knobs the synthetic traces need (their sensitivities are geomspace(10, 0.1), so T is larger)
KNOBS = {
    "adapmoe": {"gating": {"name": "adapmoe", "T": 0.2, "sensitivity": "trace"}},
    "adapmoe_yield": {"gating": {"name": "adapmoe_cache_aware", "T_miss": 0.25, "T_hit": 0.0, "sensitivity": "trace"}},
    "hobbit": {"placement": {"name": "low_precision_on_miss", "w_max": 0.3, "low_bits": 1.0, "sensitivity": "none"}},
}
COUNTERS = ("tokens_decode", "demand_loads_per_token", "prefetch_issued", "prefetch_used", "prefetch_wasted",
            "prefetch_late", "prefetch_skipped", "prefetch_cancelled", "hit_rate", "experts_per_token_layer",
            "single_expert_share", "link_max_concurrent")


@st.composite
def scenario(draw):
    layers, experts = draw(st.integers(1, 4)), draw(st.integers(2, 8))
    k = draw(st.integers(1, min(3, experts)))
    tr = random_trace(np.random.default_rng(draw(st.integers(0, 2**20))), tokens=draw(st.integers(1, 10)),
                      layers=layers, experts=experts, top_k=k, prefill=draw(st.integers(0, 4)),
                      sequences=draw(st.integers(1, 2)), locality=draw(st.floats(0, 0.9)))
    machine = hw(bw_Bps=draw(st.sampled_from([2e8, 1e9, 5e9, 3e10])), latency_s=draw(st.sampled_from([0.0, 2e-5])),
                 channels=draw(st.integers(1, 3)), mem_bw=draw(st.sampled_from([5e9, 2e10, 1e11])),
                 overhead_s=draw(st.sampled_from([0.0, 5e-6])), shared=draw(st.booleans()))
    opts = dict(pipelining=draw(st.booleans()), prefill=draw(st.booleans()), staging_buffers=max(6, k),
                timeline_tokens=10**6)
    name = draw(st.sampled_from(sorted(PRESETS)))
    slots = draw(st.integers(k, layers * experts))
    return tr, preset(layers, experts, k, hidden=512, width=1024), machine, opts, name, slots


def _run(sc, machine: str, generic: bool = False):
    tr, pre, h, opts, name, slots = sc
    cfg = config(policy=name, cache={"slots": slots}, **KNOBS.get(name, {}))
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, **opts))
    try:
        engine, info = build_engine(cfg, tr, h, pre, machine=machine)
    except UserError:
        assume(False)
    if generic:  # the fast machine running `decode_layer` layer by layer
        engine.decode_inline = False
    return simulate(cfg, engine=engine, info=info)


def _same(a, b) -> None:
    np.testing.assert_allclose(a.tokens["latency_s"].to_numpy(), b.tokens["latency_s"].to_numpy(), rtol=1e-9, atol=1e-15)
    for k in COUNTERS:
        assert a.summary[k] == b.summary[k], (k, a.summary[k], b.summary[k])
    for k in ("tpot_mean_s", "ttft_s", "bytes_loaded_per_token", "stall_s_per_token", "dL_est", "link_utilization",
              "compute_utilization", "cpu_wait_s_per_token"):
        x, y = a.summary[k], b.summary[k]
        assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=1e-9, abs=1e-15)), (k, x, y)
    ea = a.events.filter(a.events["lane"] == "link").sort(["issued_s", "layer", "expert"])
    eb = b.events.filter(b.events["lane"] == "link").sort(["issued_s", "layer", "expert"])
    assert ea.height == eb.height
    for col in ("issued_s", "start_s", "end_s"):
        np.testing.assert_allclose(ea[col].to_numpy(), eb[col].to_numpy(), rtol=1e-9, atol=1e-15)


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.filter_too_much])


@SETTINGS
@given(sc=scenario())
def test_the_event_machine_gives_the_fast_machines_timeline(sc):
    _same(_run(sc, "fast"), _run(sc, "events"))


@SETTINGS
@given(sc=scenario())
def test_the_fast_token_loop_is_the_generic_step(sc):
    _same(_run(sc, "fast"), _run(sc, "fast", generic=True))


@pytest.mark.slow
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(sc=scenario())
def test_the_event_machine_gives_the_fast_machines_timeline_many(sc):
    _same(_run(sc, "fast"), _run(sc, "events"))


def test_machines_are_named():
    assert engine_mod.MACHINES == ("fast", "events")


def test_one_preemption_rule_cuts_the_prefetch_that_frees_a_channel_soonest():
    """`sim.engine.preempt.choose_cut`, which the fast, event and real machines all apply: the
    prefetch whose next chunk boundary comes first (not the first one running), never one the
    layer needs, and none if a transfer ends sooner anyway."""
    from sim.engine.preempt import choose_cut
    from sim.engine.transfer import DEMAND, PREFETCH, Transfer

    def tr(seq, start, done, prio=PREFETCH, key=None):
        x = Transfer(seq if key is None else key, 1e6, prio, False, 0, 0, 0.0, seq)
        x.start_s, x.done_s = start, done
        return x

    # chunks of 1 s, no latency, now = 10.25: a started at 0 cuts at 11, b started at 9.5 at 10.5
    a, b = tr(1, 0.0, 20.0), tr(2, 9.5, 30.0)
    assert choose_cut([a, b], 2, set(), 10.25, 1.0, 0.0) == (b, 10.5)
    assert choose_cut([a, b], 2, {b.key}, 10.25, 1.0, 0.0) == (a, 11.0)  # b's expert is needed now
    assert choose_cut([a, b], 3, set(), 10.25, 1.0, 0.0) is None  # a channel is free
    c = tr(3, 0.0, 10.4, DEMAND)  # a demand load ends before any cut would
    assert choose_cut([a, b, c], 3, set(), 10.25, 1.0, 0.0) is None
    b.cancel_requested = True  # already asked to stop (the real run's copy worker)
    assert choose_cut([a, b], 2, set(), 10.25, 1.0, 0.0) == (a, 11.0)
    # a real link's ends are estimates: the rule reads them through `done_of`
    assert choose_cut([a, b], 2, set(), 10.25, 1.0, 0.0, done_of=lambda x: 10.3) is None


# ------------------------------------------------------------------ serving (batched steps)
def _serve(seed: int, machine: str):
    """A serving run drawn from `seed`: closed or open workload, an lru / lfu / arc cache (per layer
    or global) of random size, pregate prefetch (into the cache, or AdapMoE's admit=on_use, with or
    without its wait), 1-2 channels. Batched steps compute while prefetches land: the case where a
    machine must apply a completion at its time, not only at the step's next `settle`."""
    rng = np.random.default_rng(seed)
    layers, experts, k = 3, int(rng.choice([8, 16])), 2
    tr = random_trace(rng, tokens=int(rng.integers(10, 16)), layers=layers, experts=experts, top_k=k,
                      prefill=int(rng.integers(2, 6)), sequences=int(rng.integers(2, 5)),
                      locality=float(rng.choice([0.0, 0.3, 0.5, 0.8])))
    cache = {"name": str(rng.choice(["lru", "lfu", "arc"])), "scope": str(rng.choice(["layer", "global"])),
             "slots": int(rng.integers(4, layers * experts // 2 + 2))}
    prefetch = {"name": "pregate", "count": int(rng.integers(1, 3)), "depth": int(rng.integers(1, 3))}
    if rng.random() < 0.5:
        prefetch.update(admit="on_use", wait=bool(rng.random() < 0.5))
    cfg = config(cache=cache, prefetch=prefetch)
    if rng.random() < 0.7:
        cfg.workload.kind, cfg.workload.users = "closed", int(rng.integers(2, 5))
    else:
        cfg.workload.kind, cfg.workload.rate = "open", float(rng.choice([20.0, 100.0, 1000.0]))
    h = hw(bw_Bps=float(rng.choice([1e9, 5e9])), channels=int(rng.choice([1, 2, 2])),
           latency_s=float(rng.choice([0.0, 2e-5])))
    pre = preset(layers, experts, k)
    try:
        engine, info = build_engine(cfg, tr, h, pre, machine=machine)
    except UserError:  # (a cache too small for the policy's needs)
        return None
    return simulate(cfg, tr, h, engine=engine, info=info)


def _same_serving(a, b) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    assert a.summary.keys() == b.summary.keys()
    for key, x in a.summary.items():
        y = b.summary[key]
        if isinstance(x, float) and isinstance(y, float):
            assert x == pytest.approx(y, rel=1e-9, abs=1e-15), (key, x, y)
        else:
            assert x == y, (key, x, y)
    ra, rb = a.requests.sort("rid"), b.requests.sort("rid")
    assert ra.columns == rb.columns and ra.height == rb.height
    for col in ra.columns:
        x, y = ra[col].to_numpy(), rb[col].to_numpy()
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-15, err_msg=col)
        else:
            assert (x == y).all(), col


@pytest.mark.parametrize("seed", [*range(60), 78, 85, 178, 192])  # (the last four: seeds the bug below hit)
def test_the_event_machine_gives_the_fast_machines_serving_run(seed):
    """Serving: the same summary and per-request metrics from both machines (was: with lfu and pregate,
    a prefetch that landed while a batched step computed its residents was seen at once by the event
    machine, at the step's next `settle` by the fast one, so the two ordered the cache's calls apart)."""
    _same_serving(_serve(seed, "fast"), _serve(seed, "events"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(200, 1200))
def test_the_event_machine_gives_the_fast_machines_serving_run_many(seed):
    _same_serving(_serve(seed, "fast"), _serve(seed, "events"))


@pytest.mark.parametrize("seed", [4, 11, 12])
def test_a_prefetch_that_lands_while_a_batched_step_computes_is_seen_by_both_machines_at_once(seed):
    """Closed loop, 3 users, lfu, pregate, 2 channels: a prefetch for this layer lands as a resident
    expert's compute ends; the event machine applies it then, so the step computes it among the
    residents before its demand loads' victims are chosen. The fast machine applied it only at
    the next `settle` (was: makespans ~2.5e-4 s apart)."""
    rng = np.random.default_rng(seed)
    tr = random_trace(rng, tokens=12, layers=3, experts=8, top_k=2, prefill=5, sequences=3, locality=0.5)
    rng.integers(4, 14)
    slots = int(rng.integers(4, 14))
    runs = []
    for machine in ("fast", "events"):
        cfg = config(cache={"name": "lfu", "slots": slots}, prefetch={"name": "pregate"})
        cfg.workload.kind, cfg.workload.users = "closed", 3
        engine, info = build_engine(cfg, tr, hw(channels=2), preset(3, 8, 2), machine=machine)
        runs.append(simulate(cfg, tr, hw(channels=2), engine=engine, info=info))
    _same_serving(*runs)


def _serve_generic(seed: int):
    """`_serve` on the fast machine with its batched step written out off: the generic `batch_layer`."""
    orig = engine_mod.Engine.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        self.batch_inline = False

    engine_mod.Engine.__init__ = init
    try:
        return _serve(seed, "fast")
    finally:
        engine_mod.Engine.__init__ = orig


@pytest.mark.parametrize("seed", range(40))
def test_the_fast_batched_step_is_the_generic_one(seed):
    """`sim.engine.fast_batch.fast_batch_layer` (the fast machine's batched step, written out) gives
    exactly the generic step's summary and per-request metrics."""
    a, b = _serve(seed, "fast"), _serve_generic(seed)
    assert (a is None) == (b is None)
    if a is not None:
        assert a.summary == b.summary
        assert a.requests.equals(b.requests) and a.steps.equals(b.steps)
