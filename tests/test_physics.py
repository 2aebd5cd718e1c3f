"""Physics first: a faster machine never makes a demand-only run slower (DESIGN 9).

For every demand-only policy preset (no prefetch: its cache decisions do not depend on timing),
on random small traces, with copies sharing the device's memory bandwidth or not: more link
bandwidth, more device memory bandwidth or more link channels never increase mean TPOT; and for
`belady` (the exact optimum of hits) a larger cache never does either. The default suite draws a
few dozen cases per property; `-m slow` draws 1,000.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.trace.synthetic import random_trace
from tests.engine_helpers import config, hw, preset
from tests.test_engine_golden import _run

#: the presets without prefetch, with the knobs a synthetic trace needs (it has no sensitivities)
DEMAND_ONLY = {
    "baseline": {},
    "lfu": {},
    "fiddler": {},
    "hobbit": {"placement": {"name": "low_precision_on_miss", "w_max": 0.3, "low_bits": 1.0, "sensitivity": "none"}},
    "belady": {"cache": {"name": "belady"}},
}


@st.composite
def scenario(draw):
    layers, experts = draw(st.integers(1, 4)), draw(st.integers(2, 8))
    k = draw(st.integers(1, min(3, experts)))
    tr = random_trace(np.random.default_rng(draw(st.integers(0, 2**20))), tokens=draw(st.integers(1, 14)),
                      layers=layers, experts=experts, top_k=k, prefill=draw(st.integers(0, 4)),
                      sequences=draw(st.integers(1, 2)), locality=draw(st.floats(0, 0.9)))
    name = draw(st.sampled_from(sorted(DEMAND_ONLY)))
    slots = draw(st.integers(k, layers * experts))
    machine = dict(bw_Bps=draw(st.sampled_from([2e8, 1e9, 5e9, 3e10])), latency_s=draw(st.sampled_from([0.0, 2e-5])),
                   channels=draw(st.integers(1, 3)), mem_bw=draw(st.sampled_from([5e9, 2e10, 1e11])),
                   overhead_s=draw(st.sampled_from([0.0, 5e-6])), shared=draw(st.booleans()))
    pipelining = draw(st.booleans())
    return tr, preset(layers, experts, k, hidden=512, width=1024), name, slots, machine, pipelining


def _tpot(tr, pre, name, slots, machine, pipelining) -> float:
    sections = dict(DEMAND_ONLY[name])
    cache = {**sections.pop("cache", {}), "slots": slots}
    cfg = config(policy="baseline" if name == "belady" else name, cache=cache, **sections)
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, pipelining=pipelining,
                                                              staging_buffers=max(6, pre.top_k)))
    return _run(tr, hw(**machine), cfg, pre)[0].summary["tpot_mean_s"]


def _never_slower(sc, change) -> None:
    tr, pre, name, slots, machine, pipelining = sc
    before = _tpot(tr, pre, name, slots, machine, pipelining)
    faster_machine, more_slots = change(dict(machine), slots, name)
    after = _tpot(tr, pre, name, more_slots, faster_machine, pipelining)
    assert after <= before * (1 + 1e-9), (name, machine, faster_machine, slots, more_slots, before, after)


def _faster_link(m, slots, name):
    m["bw_Bps"] *= 3.0
    return m, slots


def _more_memory_bandwidth(m, slots, name):
    m["mem_bw"] *= 4.0
    return m, slots


def _more_channels(m, slots, name):
    m["channels"] += 1
    return m, slots


def _larger_cache(m, slots, name):
    return m, slots + 1


CHANGES = {"faster link": _faster_link, "more memory bandwidth": _more_memory_bandwidth,
           "more channels": _more_channels}
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
MANY = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.filter_too_much])


@pytest.mark.parametrize("what", sorted(CHANGES))
@FEW
@given(sc=scenario())
def test_a_faster_machine_never_slows_a_demand_only_run(what, sc):
    _never_slower(sc, CHANGES[what])


@FEW
@given(sc=scenario())
def test_a_larger_cache_never_slows_belady(sc):
    tr, pre, _, slots, machine, pipelining = sc
    if slots >= pre.layers * pre.experts:
        slots -= 1
    _never_slower((tr, pre, "belady", max(slots, pre.top_k), machine, pipelining), _larger_cache)


@pytest.mark.slow
@pytest.mark.parametrize("what", sorted(CHANGES))
@MANY
@given(sc=scenario())
def test_a_faster_machine_never_slows_a_demand_only_run_many(what, sc):
    _never_slower(sc, CHANGES[what])


@pytest.mark.slow
@MANY
@given(sc=scenario())
def test_a_larger_cache_never_slows_belady_many(sc):
    tr, pre, _, slots, machine, pipelining = sc
    if slots >= pre.layers * pre.experts:
        slots -= 1
    _never_slower((tr, pre, "belady", max(slots, pre.top_k), machine, pipelining), _larger_cache)


def test_the_unified_memory_counterexample_is_gone():
    """A Jetson-like machine (71.4 GB/s memory) whose only change is a faster link was up to 1.8x
    slower (2e10 -> 7e10 B/s), because a copy in flight took the link's whole bandwidth from
    compute for the whole op, however briefly they overlapped; the same up to 1e308 B/s."""
    tr = random_trace(np.random.default_rng(0), tokens=20, layers=4, experts=8, top_k=2, locality=0.4)
    pre = preset(4, 8, 2, hidden=4096, width=14336)
    machine = dict(latency_s=1e-4, channels=1, mem_bw=7.14e10, overhead_s=1e-5, shared=True)
    tpot = [_tpot(tr, pre, "baseline", 8, dict(machine, bw_Bps=bw), False) for bw in (1.36e9, 2e10, 7e10, 1e300)]
    assert tpot == sorted(tpot, reverse=True)
