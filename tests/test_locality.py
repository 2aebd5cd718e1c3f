"""SRP, SCH and the Belady hit ceiling (`sim.trace.locality`) and their part of `python -m sim stats`."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

import sim
from sim.cli import main as cli
from sim.trace import locality as lc
from sim.trace.format import ModelInfo, Trace, write_trace
from sim.trace.stats import token_mask
from sim.trace.synthetic import random_trace

#: what `sim.run` needs besides the shape to build a model preset for a synthetic trace
MODEL = {"model.heads": 8, "model.kv_heads": 8, "model.head_dim": 128, "model.vocab": 1000, "model.hidden": 256,
         "model.expert_width": 512, "model.bits": 16, "model.attn_bits": 16}


def hand_trace() -> Trace:
    """2 layers x 4 experts, top-2, 4 decode tokens of one sequence (dyadic weights: exact sums).

    Layer 0: t0 {0: 3/4, 1: 1/4}, t1 {0: 1/2, 2: 1/2}, t2 {1: 5/8, 0: 3/8}, t3 {3: 3/4, 2: 1/4}.
    Layer 1: every token {2, 3}, weights (1, 1) before renormalisation (1/2 each after)."""
    ids = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 3]], [[1, 0], [2, 3]], [[3, 2], [2, 3]]])  # [T, L, k]
    w = np.array([[[0.75, 0.25], [1, 1]], [[0.5, 0.5], [1, 1]], [[0.625, 0.375], [1, 1]],
                  [[0.75, 0.25], [1, 1]]])  # [T, L, k]
    T = ids.shape[0]
    return Trace(model=ModelInfo(name="t", layers=2, experts=4, top_k=2), seq=np.zeros(T, np.int32),
                 pos=np.arange(T, dtype=np.int32), is_decode=np.ones(T, bool), experts=ids.astype(np.int16),
                 weights=w.astype(np.float32))


def exact(x: float, frac: Fraction) -> None:
    assert x == float(frac), (x, frac)


def test_hand_computed_srp_and_sch():
    tr = hand_trace()
    res = lc.locality(tr, token_mask(tr), segments=(1, 2, 3, 4), cache_experts=2)
    assert res["cache_experts"] == 2
    one = res["by_m"][1]
    np.testing.assert_array_equal(one["srp"], 1.0)  # the token's own top-k carries all its weight
    np.testing.assert_array_equal(one["sch"], 1.0)
    two = res["by_m"][2]  # segments (t0, t1) and (t2, t3)
    assert two["segments"] == 2
    # layer 0: (t0, t1): scores e0 5/4, e2 1/2, e1 1/4 -> (5/4 + 1/2) / 2 = 7/8; counts 2, 1, 1 -> 3/4
    #          (t2, t3): e3 3/4, e1 5/8, e0 3/8, e2 1/4 -> (3/4 + 5/8) / 2 = 11/16; counts 1 each -> 1/2
    exact(two["srp"][0], (Fraction(7, 8) + Fraction(11, 16)) / 2)  # 25/32
    exact(two["sch"][0], (Fraction(3, 4) + Fraction(1, 2)) / 2)  # 5/8
    exact(two["srp"][1], Fraction(1))
    exact(two["sch"][1], Fraction(1))
    three = res["by_m"][3]  # one segment (t0, t1, t2); the tail t3 is dropped
    assert three["segments"] == 1
    exact(three["srp"][0], (Fraction(13, 8) + Fraction(7, 8)) / 3)  # 5/6
    exact(three["sch"][0], Fraction(3 + 2, 6))  # counts e0 3, e1 2, e2 1
    four = res["by_m"][4]
    exact(four["srp"][0], (Fraction(13, 8) + Fraction(7, 8)) / 4)  # 5/8
    exact(four["sch"][0], Fraction(5, 8))  # counts e0 3, e1 2, e2 2, e3 1
    c3 = lc.locality(tr, token_mask(tr), segments=(4,), cache_experts=3)["by_m"][4]
    exact(c3["sch"][0], Fraction(7, 8))
    exact(lc.locality(tr, token_mask(tr), segments=(4,), cache_experts=4)["by_m"][4]["sch"][0], Fraction(1))
    assert lc.locality(tr, token_mask(tr), segments=(5,))["by_m"][5]["segments"] == 0  # longer than the sequence


def test_summary_json_means_over_layers():
    from sim.trace.stats import summarize

    s = summarize(hand_trace(), segments=(2,), cache_experts=2, slots=())
    loc = s["locality"]
    assert loc["tail"] == "dropped" and loc["segment_counts"] == {"2": 2} and s["belady_ceiling"] is None
    exact(loc["srp"]["2"]["mean"], (Fraction(25, 32) + 1) / 2)
    exact(loc["sch"]["2"]["mean"], (Fraction(5, 8) + 1) / 2)
    json.dumps(s, allow_nan=False)


def test_segments_stay_within_a_sequence():
    seq = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2])
    np.testing.assert_array_equal(lc.segment_rows(seq, 2), [[0, 1], [3, 4], [5, 6]])
    np.testing.assert_array_equal(lc.segment_rows(seq, 1), np.arange(9)[:, None])
    assert lc.segment_rows(seq, 6).shape == (0, 6)
    assert lc.segment_rows(np.zeros(0, np.int32), 3).shape == (0, 3)


def test_shuffled_baseline_keeps_popularity_and_loses_order():
    tr = random_trace(np.random.default_rng(5), tokens=400, layers=3, experts=8, top_k=2, sequences=2, locality=0.9)
    res = lc.locality(tr, token_mask(tr), segments=(1, 16), cache_experts=4)["by_m"]
    np.testing.assert_allclose(res[1]["srp_shuffled"], res[1]["srp"])  # one token: order does not matter
    np.testing.assert_allclose(res[1]["sch_shuffled"], 1.0)
    assert np.all(res[16]["sch"] > res[16]["sch_shuffled"]) and np.all(res[16]["srp"] > res[16]["srp_shuffled"])
    ids = tr.experts.astype(np.int64)
    sh, _ = lc.shuffle_within_layers(ids, tr.weights)
    for layer in range(3):  # each layer's rows are a permutation of its own rows
        a = sorted(map(tuple, ids[:, layer].tolist()))
        assert a == sorted(map(tuple, sh[:, layer].tolist()))


def test_srp_undefined_without_weights():
    tr = hand_trace()
    tr.source["weights_recorded"] = False
    res = lc.locality(tr, token_mask(tr), segments=(2,))["by_m"][2]
    assert res["srp"] is None and res["sch"] is not None


@pytest.mark.parametrize(("seed", "experts", "top_k", "prefill"), [(0, 5, 2, 3), (1, 4, 1, 0), (2, 6, 3, 4)])
def test_belady_ceiling_equals_a_belady_run(seed, experts, top_k, prefill):
    tr = random_trace(np.random.default_rng(seed), tokens=12, layers=3, experts=experts, top_k=top_k,
                      prefill=prefill, sequences=2, locality=0.5)
    total = 3 * experts
    sizes = lc.ceiling_slots([top_k, top_k + 1, total // 2, total, total + 7], 3, experts, top_k)
    assert sizes[-1] == total  # clipped as the simulator clips it
    ceiling = lc.belady_ceiling(tr, sizes)
    for c in sizes:
        run = sim.run(trace=tr, hw="rtx4090.yaml", policy="baseline",
                      **{"cache.name": "belady", "cache.scope": "global", "cache.slots": c}, **MODEL)
        assert ceiling[c]["hit_rate"] == run.summary["hit_rate"], (c, ceiling[c], run.summary["hit_rate"])
        np.testing.assert_array_equal(ceiling[c]["hits"], run.layers["hits"].to_numpy())
        np.testing.assert_array_equal(ceiling[c]["needed"], run.layers["needed"].to_numpy())


@pytest.mark.parametrize("seed", [3, 4])
def test_no_online_eviction_policy_beats_the_ceiling(seed):
    """Not circular: the ceiling (MIN) against the hit rates of every online cache policy, without prefetch."""
    tr = random_trace(np.random.default_rng(seed), tokens=40, layers=4, experts=8, top_k=2, prefill=4,
                      sequences=2, locality=0.6)
    sizes = [4, 8, 16]
    ceiling = lc.belady_ceiling(tr, sizes)
    for c in sizes:
        for name, scope in (("lru", "global"), ("lru", "layer"), ("lfu", "global"), ("arc", "layer"),
                            ("arc", "global"), ("mrs", "global")):
            run = sim.run(trace=tr, hw="rtx4090.yaml", policy="baseline",
                          **{"cache.name": name, "cache.scope": scope, "cache.slots": c}, **MODEL)
            assert run.summary["hit_rate"] <= ceiling[c]["hit_rate"] + 1e-12, (c, name, scope)


def test_stats_command_on_the_toy_trace(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert cli(["stats", "trace=toy", "slots=64", "segment=4,16", f"json={out}"]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    assert "SRP m=16" in header and "SCH m=16 c=4" in header and "H bits" in header  # the old columns stay
    assert "reuse of the previous token's experts" in text  # and the old lines
    assert "a per-layer cache of 4 experts fixed for 16 tokens would hit at most" in text
    assert "no eviction policy can hit more than" in text and "at 64 slots" in text
    data = json.loads(out.read_text())
    loc, ceil = data["locality"], data["belady_ceiling"]
    assert loc["segments"] == [4, 16] and loc["cache_experts"] == 4
    for name in ("srp", "sch"):
        for m in ("4", "16"):
            r = loc[name][m]
            assert len(r["by_layer"]) == 32 and r["mean"] == pytest.approx(np.mean(r["by_layer"]))
            assert 0 < r["shuffled_mean"] < r["mean"] <= 1
    assert ceil["slots"] == [64] and len(ceil["by_slots"]["64"]["by_layer"]) == 32
    run = sim.run(trace="toy", hw="rtx4090.yaml", policy="baseline",
                  **{"cache.name": "belady", "cache.scope": "global", "cache.slots": 64})
    assert ceil["by_slots"]["64"]["mean"] == run.summary["hit_rate"]  # with the toy's prefills
    assert f"{100 * run.summary['hit_rate']:.1f}%" in text


def test_stats_command_skips_and_defaults(tmp_path, capsys):
    tr = random_trace(np.random.default_rng(4), tokens=30, layers=2, experts=4, top_k=2, sequences=2)
    write_trace(tr, tmp_path / "t")
    out = tmp_path / "s.json"
    assert cli(["stats", f"trace={tmp_path / 't'}", "slots=[]", "segment=[]", f"json={out}"]) == 0
    data = json.loads(out.read_text())
    assert data["locality"] is None and data["belady_ceiling"] is None
    assert "SRP" not in capsys.readouterr().out
    assert cli(["stats", f"trace={tmp_path / 't'}", f"json={out}"]) == 0
    data = json.loads(out.read_text())
    assert data["locality"]["segments"] == [1, 4, 16, 64] and data["locality"]["segment_counts"]["64"] == 0
    assert data["belady_ceiling"]["slots"] == [8]  # the defaults clipped to 2 x 4 experts
    assert data["belady_ceiling"]["by_slots"]["8"]["mean"] == 1 - 8 / 240  # only the 8 first uses miss (60 tokens x 2 layers x top-2)
    assert "m=64: no sequence has 64 decode tokens" in capsys.readouterr().out


@pytest.mark.parametrize(("arg", "msg"), [
    ("segment=0", "'segment[0]': 0"), ("segment=[4,-1]", "'segment[1]': -1"), ("segment=2.5", "segment"),
    ("slots=0", "'slots[0]': 0"), ("slots=[16,-3]", "'slots[1]': -3"), ("slots=1", "top_k = 2"),
    ("cache_experts=0", "'cache_experts': 0"), ("cache_experts=9", "must be 1..8"),
])
def test_bad_inputs_exit_2(arg, msg, capsys):
    assert cli(["stats", "trace=toy", arg]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err, err
