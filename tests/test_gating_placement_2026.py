"""`buddy` (BuddyMoE), `hybrid_split` (HybriMoE) and `popularity_precision` (Fate): each decision rule
by hand on a tiny trace, their bad knobs, the lower bound staying valid, and end-to-end runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import sim
from policies.base import CPU, LOAD, LOW
from policies.registry import GATING, PLACEMENT
from sim.errors import UserError
from sim.runner import build_engine, simulate
from sim.trace.format import write_trace
from sim.trace.synthetic import random_trace
from tests.engine_helpers import config, hw, preset, trace
from tests.test_policy_units import ctx_for, make

FAST = {"engine.max_tokens": 24}  # keep the bundled-trace runs short

# ------------------------------------------------------------------------------------- buddy

# one layer, 4 experts, top-2; rows 0-2 are the past, row 3 the step under test: expert 3 (weight
# 0.15 < w_max 0.2, not the top-1) is missed. Co-activation of 3 over rows 0-2: with 1 once (row 0),
# with 2 twice (rows 1, 2), with 0 never.
BUDDY_ROWS = [[[3, 1]], [[3, 2]], [[2, 3]], [[0, 3]]]
BUDDY_W = [[[0.6, 0.4]], [[0.6, 0.4]], [[0.6, 0.4]], [[0.85, 0.15]]]


def _buddy_ctx(rows=BUDDY_ROWS, weights=BUDDY_W):
    tr = trace(rows, 1, 4, weights=weights)
    tr.sensitivity = np.array([2.0])
    return ctx_for(tr, slots=4)


def test_buddy_online_runs_the_most_coactivated_resident():
    ctx = _buddy_ctx()
    b = make(GATING, "buddy", ctx, w_max=0.2)
    for k in (1, 2):
        ctx.cache.insert_resident(k, ctx.preset.expert_bytes)
    # before any past row: no co-activation counted, so no buddy; 3 is kept (it will be loaded)
    ids, w, dL = b.decide(3, 0)
    assert ids == [0, 3] and w == pytest.approx([0.85, 0.15]) and dL == 0.0
    for t in range(3):  # rows 0-2 gated: counts(3, 1) = 1, counts(3, 2) = 2
        b.decide(t, 0)
    ids, w, dL = b.decide(3, 0)
    assert ids == [0, 2]  # 2 (co-activated twice) beats 1 (once)
    assert w == pytest.approx([0.85, 0.15])  # the buddy keeps the missed expert's weight
    assert dL == pytest.approx(0.5 * 2.0 * 0.15**2)  # 1/2 * S_l * w^2 = 0.0225
    ctx.cache.evict(2)  # 2 leaves: the next buddy is 1
    assert b.decide(3, 0)[0] == [0, 1]
    ctx.cache.evict(1)  # none resident: keep 3
    assert b.decide(3, 0)[0] == [0, 3]
    # a row is counted once, however often it is decided: counts(3, 2) is still 2, counts(3, 1) 1
    assert b.count[0][3][2] == 2 and b.count[0][3][1] == 1 and b.count[0][3][0] == 1


def test_buddy_keeps_heavy_top1_and_present_and_drops_without_buddy():
    ctx = _buddy_ctx()
    b = make(GATING, "buddy", ctx, w_max=0.2, drop_without_buddy=True)
    for t in range(3):
        b.decide(t, 0)
    # no resident buddy: dropped; 0 alone, renormalised to 1; dL = 1/2 * 2 * 0.15^2
    ids, w, dL = b.decide(3, 0)
    assert ids == [0] and w == pytest.approx([1.0]) and dL == pytest.approx(0.0225)
    ctx.cache.insert_resident(3, ctx.preset.expert_bytes)  # present: it runs
    assert b.decide(3, 0) == ([0, 3], pytest.approx([0.85, 0.15]), 0.0)
    # w_max below its weight: never replaced
    b2 = make(GATING, "buddy", _buddy_ctx(), w_max=0.1, drop_without_buddy=True)
    assert b2.decide(3, 0)[0] == [0, 3]


def test_buddy_fit_counts_come_from_the_profile_trace(tmp_path):
    fit = trace(BUDDY_ROWS[:3], 1, 4, weights=BUDDY_W[:3])  # the past rows as a separate profile trace
    write_trace(fit, tmp_path / "fit")
    ctx = _buddy_ctx([[[0, 3]]], [[[0.85, 0.15]]])
    b = make(GATING, "buddy", ctx, w_max=0.2, fit=str(tmp_path / "fit"))
    assert b.order[0][3] == [2, 1]  # buddies of 3: 2 (twice), then 1 (once); 0 never
    for k in (1, 2):
        ctx.cache.insert_resident(k, ctx.preset.expert_bytes)
    assert b.decide(0, 0)[0] == [0, 2]


def test_buddy_bound_plan_is_what_it_runs_whatever_the_cache():
    ctx = _buddy_ctx()
    plan = make(GATING, "buddy", ctx, w_max=0.2).bound_plan()
    # rows 0-2: weight 0.4 >= 0.2, both kept; row 3: 0.15 < 0.2, only the top-1 is certain
    assert plan.ids[:, 0].tolist() == [[3, 1], [3, 2], [2, 3], [0, -1]]


# -------------------------------------------------------------------------------- hybrid_split

# costs in units u = one expert on the CPU (bytes / 1e10 B/s): the link moves an expert in 1.5 u
# (bandwidth 1e10 / 1.5), the device computes one in 0.1 u (1e11 B/s); no latency or overhead.
def _split_hw():
    return hw(bw_Bps=1e10 / 1.5, latency_s=0.0, channels=1, mem_bw=1e11)


def test_hybrid_split_assignment_on_a_three_miss_step():
    tr = trace([[[0, 1, 2, 3]]], 1, 8)  # top-4: 0 resident, 1, 2, 3 missed
    ctx = ctx_for(tr, slots=8, h=_split_hw())
    ctx.gating_plan = make(GATING, "topk", ctx).plan()
    ctx.cache.insert_resident(0, ctx.preset.expert_bytes)
    p = make(PLACEMENT, "hybrid_split", ctx)
    u = p.cpu_s
    assert p.load_s == pytest.approx(1.5 * u) and p.expert_s == pytest.approx(0.1 * u)
    # device(m): 0.1 (the resident), then each load computed after it arrives at 1.5 j:
    #   m=0: max(3 u CPU, 0.1) = 3      m=1: max(2, 1.5 + 0.1 = 1.6) = 2
    #   m=2: max(1, max(1.6, 3.0) + 0.1 = 3.1) = 3.1      m=3: max(0, 4.6) = 4.6   -> m = 1
    assert [p.place(k, 0, 1 / 4) for k in (1, 2, 3)] == [LOAD, CPU, CPU]
    # asked again after the engine began the load of 1 (now present): the step's plan holds
    ctx.cache.begin_load(1, ctx.preset.expert_bytes)
    assert p.place(2, 0, 1 / 4) == CPU
    # an expert outside the planned set (a substitute): the better given 1 load and 2 CPU experts:
    #   load: max(2, device(2) = 3.1) = 3.1;  CPU: max(3, 1.6) = 3  -> CPU
    assert p.place(5, 0, 1 / 4) == CPU


def test_hybrid_split_ties_go_to_loading():
    from policies.placement.hybrid_split import best_split

    # one miss, CPU 2.0 vs load 1.9 + device 0.1 = 2.0: a tie, so load
    assert best_split(0, 1, 0.1, 1.9, 2.0, 1) == 1
    assert best_split(0, 1, 0.1, 1.9, 1.99, 1) == 0
    # two channels, two misses, load 1 + 0.1 each, CPU 1.5: both arrive at 1: device 1.2 < 1.5
    assert best_split(0, 2, 0.1, 1.0, 1.5, 2) == 2


def test_hybrid_split_end_to_end_beats_the_per_expert_rules():
    """One token, one layer, top-3, all missed: attention a, then the split above with r = 0:
    m=0: 3 u; m=1: max(2 u, 1.6 u) = 2 u; m=2: max(1, 3.1) -> tpot = a + 2 u. `cpu_on_miss`
    and `cost_based` (CPU 1 u < load + compute 1.6 u) put all three on the CPU: a + 3 u."""
    pre, h = preset(1, 8, 3), _split_hw()
    tr = trace([[[0, 1, 2]]], 1, 8)
    got = {}
    for name in ("hybrid_split", "cpu_on_miss", "cost_based"):
        cfg = config(cache={"slots": 8}, placement={"name": name})
        engine, info = build_engine(cfg, tr, h, preset=pre)
        got[name] = simulate(cfg, engine=engine, info=info).summary["tpot_mean_s"]
        u = engine.ctx.cost.expert_compute_s(1, on_cpu=True)
        a = engine.ctx.cost.attention_s(0)
    assert got["hybrid_split"] == pytest.approx(a + 2 * u, rel=1e-9)
    assert got["cpu_on_miss"] == pytest.approx(a + 3 * u, rel=1e-9)
    assert got["cost_based"] == pytest.approx(a + 3 * u, rel=1e-9)


# ------------------------------------------------------------------------ popularity_precision

# one layer, 4 experts, top-2; usage before t=3: expert 2 three times, 1 twice, 3 once, 0 never
POP_ROWS = [[[2, 1]], [[2, 3]], [[2, 1]], [[0, 3]]]


def test_popularity_precision_online_by_rank():
    tr = trace(POP_ROWS, 1, 4)
    tr.sensitivity = np.array([2.0])
    ctx = ctx_for(tr)
    p = make(PLACEMENT, "popularity_precision", ctx, hot_share=0.5, low_bits=4.0)
    assert p.n_hot == 2  # ceil(0.5 * 4)
    # t=0: nothing counted yet; all tie at 0, lower ids first: hot {0, 1}
    assert [p.place(k, 0, 0.5) for k in range(4)] == [LOAD, LOAD, LOW, LOW]
    # t=2: rows 0, 1: 2 twice, 1 and 3 once (tie: 1 first), 0 never: hot {2, 1}
    assert [p.place(k, 2, 0.5) for k in range(4)] == [LOW, LOAD, LOAD, LOW]
    # t=3: rows 0-2: 2 x3, 1 x2, 3 x1, 0 x0: hot {2, 1}
    assert [p.place(k, 3, 0.5) for k in range(4)] == [LOW, LOAD, LOAD, LOW]
    # the low-bit copy: the preset's 3 * 1024 * 4096 parameters at 4 bits (no groups) = 6,291,456 B
    assert p.low_bytes == pytest.approx(3 * 1024 * 4096 * 4 / 8)
    # dL = 1/2 * S_l * w^2 * 4^-(4 - 1) = 0.5 * 2 * 0.09 / 64
    assert p.dL(0, 0.3) == pytest.approx(0.5 * 2.0 * 0.09 / 64)
    allhot = make(PLACEMENT, "popularity_precision", ctx, hot_share=1.0, low_bits=4.0)
    nohot = make(PLACEMENT, "popularity_precision", ctx, hot_share=0.0, low_bits=4.0)
    assert {allhot.place(k, 3, 0.5) for k in range(4)} == {LOAD}
    assert {nohot.place(k, 3, 0.5) for k in range(4)} == {LOW}


def test_popularity_precision_fit_trace(tmp_path):
    # profile: 3 used three times, 0 twice, 1 once; hot_share 0.25 -> ceil(1) = 1 hot expert: 3
    write_trace(trace([[[3, 0]], [[3, 0]], [[3, 1]]], 1, 4), tmp_path / "fit")
    ctx = ctx_for(trace(POP_ROWS, 1, 4))
    p = make(PLACEMENT, "popularity_precision", ctx, hot_share=0.25, low_bits=4.0, fit=str(tmp_path / "fit"),
             sensitivity="none")
    assert [p.place(k, 0, 0.5) for k in range(4)] == [LOW, LOW, LOW, LOAD]
    assert p.dL(0, 0.5) == 0.0  # sensitivity none


# ----------------------------------------------------------------------------------- bad knobs


def test_bad_knobs_are_user_errors_naming_the_knob(tmp_path):
    ctx = _buddy_ctx()
    with pytest.raises(UserError, match=r"gating\.w_max"):
        GATING.knobs("buddy", {"w_max": 1.5})
    with pytest.raises(UserError, match=r"gating\.fit"):
        make(GATING, "buddy", ctx, fit=str(tmp_path / "missing"))
    write_trace(ctx.trace, tmp_path / "self")
    with pytest.raises(UserError, match=r"gating\.fit=.*replayed trace"):
        make(GATING, "buddy", ctx, fit=str(tmp_path / "self"))
    with pytest.raises(UserError, match=r"placement\.hot_share"):
        make(PLACEMENT, "popularity_precision", ctx, hot_share=1.5, low_bits=4.0)
    with pytest.raises(UserError, match=r"placement\.low_bits"):
        make(PLACEMENT, "popularity_precision", ctx, low_bits=16.0)  # the preset's own 16 bits
    with pytest.raises(UserError, match=r"placement\.fit"):
        make(PLACEMENT, "popularity_precision", ctx, low_bits=4.0, fit=str(tmp_path / "missing"))
    stored = dataclasses.replace(hw(), expert_tier="storage", links={"storage_to_device": hw().expert_link})
    with pytest.raises(UserError, match=r"'hybrid_split'"):
        make(PLACEMENT, "hybrid_split", ctx_for(ctx.trace, h=stored))


# ------------------------------------------------------------------------- bound and end to end

CASES = {
    "buddy": {"gating": {"name": "buddy", "w_max": 0.3, "sensitivity": "none"}},
    "buddy_drop": {"gating": {"name": "buddy", "w_max": 0.3, "drop_without_buddy": True, "sensitivity": "none"}},
    "hybrid_split": {"placement": {"name": "hybrid_split"}},
    "hybrid_split_static": {"placement": {"name": "hybrid_split"}, "cache": {"name": "static"}},
    "buddy_hybrid_split": {"gating": {"name": "buddy", "w_max": 0.3, "sensitivity": "none"},
                           "placement": {"name": "hybrid_split"}},  # a stateful gating: no gating plan
    "popularity_precision": {"placement": {"name": "popularity_precision", "low_bits": 4.0, "sensitivity": "none"}},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_lower_bound_holds(case, seed):
    tr = random_trace(np.random.default_rng(seed), tokens=12, layers=3, experts=6, top_k=3, prefill=2,
                      sequences=2, locality=0.5)
    pre = preset(3, 6, 3, hidden=512, width=1024)
    sections = {k: dict(v) for k, v in CASES[case].items()}
    sections.setdefault("cache", {})["slots"] = 6 + seed * 2
    for machine in (hw(bw_Bps=1e9, mem_bw=2e10), hw(bw_Bps=5e9, channels=2, mem_bw=1e11, latency_s=2e-5)):
        s = simulate(config(bound=True, **sections), trace=tr, hw=machine, preset=pre).summary
        assert s["tpot_mean_s"] >= s["tpot_lower_bound_s"] * (1 - 1e-9), (case, s)


@pytest.mark.parametrize("keys", [
    {"gating.name": "buddy", "gating.w_max": 0.3},
    {"policy": "fiddler", "placement.name": "hybrid_split"},
    {"placement.name": "popularity_precision", "placement.low_bits": 1.0},
], ids=["buddy", "hybrid_split", "popularity_precision"])
def test_end_to_end_on_the_bundled_trace(keys):
    res = sim.run(hw="rtx4090.yaml", bound=True, **{"cache.slots": 8}, **keys, **FAST)
    s = res.summary
    assert s["tokens_decode"] == FAST["engine.max_tokens"]
    assert s["tpot_mean_s"] >= s["tpot_lower_bound_s"]
    if "gating.name" in keys or "placement.low_bits" in keys:
        assert s["dL_est"] > 0  # something was replaced or loaded at low precision
