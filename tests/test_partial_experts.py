"""`partial_experts` (MoEpic): resident top slices of the hot experts, a miss of one moves only the rest."""

from __future__ import annotations

import numpy as np
import pytest

from policies.base import LOAD, LOW
from policies.registry import PLACEMENT
from sim.errors import UserError
from sim.runner import build_engine, simulate
from sim.trace.format import write_trace
from sim.trace.split import split_trace
from sim.trace.synthetic import random_trace
from tests.engine_helpers import config, hw, preset, trace
from tests.test_policy_units import ctx_for, make


def test_hot_set_bytes_and_decisions_by_hand():
    # 2 layers x 4 experts, top-1; decode uses: layer 0: 0, 0, 1, 2 -> expert 0 most used;
    # layer 1: 3, 3, 3, 1 -> expert 3 (key 7) most used, then key 5 and keys 1, 2 once each.
    tr = trace([[[0], [3]], [[0], [3]], [[1], [3]], [[2], [1]]], 2, 4)
    ctx = ctx_for(tr, slots=4)
    B = ctx.preset.expert_bytes
    # share 0.5 of 4 slots in slices of 0.25 B: floor(0.5 * 4B / 0.25B) = 8 slices = every expert
    p = make(PLACEMENT, "partial_experts", ctx, slice=0.25, share=0.5)
    assert len(p.hot) == 8 and p.reserved_bytes == pytest.approx(2 * B) and p.low_bytes == pytest.approx(0.75 * B)
    # share 0.25: floor(0.25 * 4B / 0.5B) = 2 slices of half an expert: the two most used keys, 7 then 0
    p = make(PLACEMENT, "partial_experts", ctx, slice=0.5, share=0.25)
    assert p.hot == {7, 0} and p.reserved_bytes == pytest.approx(B)
    assert p.place(7, 0, 0.1) == LOW and p.place(5, 0, 0.9) == LOAD and p.dL(1, 0.5) == 0.0
    # 3 slices: 7 and 0, then the lowest key of the tie at one use (keys 1, 2, 5) -> 1
    p = make(PLACEMENT, "partial_experts", ctx, slice=0.5, share=0.375)
    assert p.hot == {7, 0, 1}


@pytest.mark.parametrize("knob", [{"slice": 0.0}, {"slice": 1.0}, {"share": 1.5}])
def test_bad_knobs_name_the_knob(knob):
    ctx = ctx_for(trace([[[0]]], 1, 4), slots=4)
    with pytest.raises(UserError, match=f"placement.{next(iter(knob))} must be in"):
        make(PLACEMENT, "partial_experts", ctx, **knob)


def test_the_slices_leave_the_cache_and_a_hot_miss_moves_only_the_rest():
    tr = random_trace(np.random.default_rng(3), tokens=24, layers=3, experts=8, top_k=2)
    pre, h = preset(3, 8, 2), hw()
    cfg = config(cache={"name": "lru", "scope": "global", "slots": 8},
                 placement={"name": "partial_experts", "slice": 0.5, "share": 0.5})
    engine, info = build_engine(cfg, tr, h, pre)
    # 0.5 * 8 slots in half-expert slices: 8 hot experts, 4 slots' bytes reserved, 4 slots left
    assert info["cache_slots"] == 4 and engine.ctx.capacity_slots == 4
    assert info["placement_reserved_bytes"] == pytest.approx(4 * pre.expert_bytes)
    res = simulate(cfg, tr, h, engine=engine, info=info)
    assert res.summary["cache_slots"] == 4 and res.summary["dL_est"] == 0.0
    hot, E, B = engine.placement.hot, 8, pre.expert_bytes
    loads = res.events.filter(res.events["lane"] == "link").to_dicts()
    assert loads
    for ev in loads:  # a hot expert's miss moves its bottom half into a staging buffer; another, all of it
        key = ev["layer"] * E + ev["expert"]
        if key in hot:
            assert ev["bytes"] == pytest.approx(0.5 * B) and ev["staging"], ev
        else:
            assert ev["bytes"] == pytest.approx(B), ev


def test_bound_holds_and_realrun_refuses(tmp_path):
    tr = random_trace(np.random.default_rng(4), tokens=40, layers=4, experts=8, top_k=2, sequences=2, locality=0.5)
    fit, test = split_trace(tr, 0.5, "position")
    fit_dir = write_trace(fit, tmp_path / "fit")
    pre, h = preset(4, 8, 2), hw()
    for slices in (0.25, 0.5, 0.75):
        cfg = config(cache={"name": "lru", "scope": "layer", "slots": 12}, bound=True,
                     placement={"name": "partial_experts", "slice": slices, "fit": str(fit_dir)})
        s = simulate(cfg, test, h, preset=pre).summary
        assert s["tpot_lower_bound_s"] <= s["tpot_mean_s"] * (1 + 1e-9), (slices, s)
    from sim.realrun.run import refuse_reserved

    engine, _ = build_engine(cfg, test, h, pre)
    with pytest.raises(UserError, match="the real run does not split experts"):
        refuse_reserved(engine.placement)


def test_no_slice_fits_is_refused_and_in_sample_and_oracle_sizes_are_said():
    ctx = ctx_for(trace([[[0]]], 1, 4), slots=2)
    with pytest.raises(UserError, match="holds no slice"):  # 0.1 * 2 slots < one slice of 0.5 expert
        make(PLACEMENT, "partial_experts", ctx, slice=0.5, share=0.1)
    tr = random_trace(np.random.default_rng(5), tokens=16, layers=2, experts=8, top_k=2)
    cfg = config(cache={"name": "lru", "scope": "layer", "slots": 8}, oracle=True,
                 placement={"name": "partial_experts", "slice": 0.5, "share": 0.5})
    s = simulate(cfg, tr, hw(), preset=preset(2, 8, 2)).summary
    # 0.5 of 8 slots in half-expert slices: 8 slices, 4 slots reserved, 4 left
    assert "placement.fit" in s["in_sample_fit"] and s["cache_slots"] == 4 and s["cache_slots_total"] == 8
    # the best offline schedule is for the whole expert memory (8 slots, all loads), not what the slices left
    ocfg = config(cache={"name": "belady", "slots": 8}, prefetch={"name": "oracle"})
    assert s["oracle_tpot_mean_s"] <= simulate(ocfg, tr, hw(), preset=preset(2, 8, 2)).summary["tpot_mean_s"]


def test_an_offline_schedule_refuses_a_placement_that_changes_the_loads():
    tr = random_trace(np.random.default_rng(6), tokens=8, layers=2, experts=8, top_k=2)
    for placement in ("cpu_on_miss", "partial_experts"):
        cfg = config(policy="oracle", cache={"name": "belady", "slots": 8}, placement={"name": placement})
        with pytest.raises(UserError, match="for placement.name=load only"):
            build_engine(cfg, tr, hw(), preset(2, 8, 2))


@pytest.mark.parametrize("staging", [None, 9])
def test_staged_prefetches_leave_top_k_buffers_to_demand_loads(staging):
    """A decode layer's low-copy demand loads always find a staging buffer, however many staged
    prefetches are in flight (was: 'N staging buffers in use, only M exist' on a top-8 model)."""
    for seed in range(6):
        tr = random_trace(np.random.default_rng(seed), tokens=12, layers=4, experts=32, top_k=8, prefill=3,
                          sequences=2, locality=0.3)
        for placement in ({"name": "partial_experts"},
                          {"name": "low_precision_on_miss", "w_max": 0.5, "low_bits": 1, "sensitivity": "none"}):
            cfg = config(cache={"name": "lru", "slots": 64}, placement=placement,
                         prefetch={"name": "pregate", "admit": "on_use", "count": 4, "depth": 1, "wait": True})
            if staging:
                cfg.engine.staging_buffers = staging
            s = simulate(cfg, tr, hw(bw_Bps=1e9, channels=2), preset=preset(4, 32, 8)).summary
            assert s["tokens_decode"] == 24 and s["prefetch_issued"] > 0
    cfg.engine.staging_buffers = 8  # = top_k: nothing left for a staged prefetch
    with pytest.raises(UserError, match="none is left for the staged prefetches"):
        build_engine(cfg, tr, hw(), preset(4, 32, 8))
