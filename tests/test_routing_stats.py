"""Routing statistics (sim.trace.stats) and the `stats` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sim.cli import main as cli
from sim.errors import UserError
from sim.trace import stats as rs
from sim.trace.format import ModelInfo, Trace, write_trace
from sim.trace.synthetic import random_trace


def make_trace(experts: np.ndarray, *, E: int, seq=None, is_decode=None, weights=None) -> Trace:
    """A trace from ids [T, L, k] (weights uniform unless given)."""
    T, L, k = experts.shape
    seq = np.zeros(T, np.int32) if seq is None else np.asarray(seq, np.int32)
    pos = np.zeros(T, np.int32)
    for s in np.unique(seq):
        pos[seq == s] = np.arange((seq == s).sum())
    return Trace(
        model=ModelInfo(name="t", layers=L, experts=E, top_k=k),
        seq=seq, pos=pos,
        is_decode=np.ones(T, bool) if is_decode is None else np.asarray(is_decode, bool),
        experts=experts.astype(np.int16),
        weights=np.full((T, L, k), 1.0 / k, np.float32) if weights is None else weights.astype(np.float32),
    )


def uniform_ids(rng: np.random.Generator, T: int, L: int, E: int, k: int) -> np.ndarray:
    return np.argsort(rng.random((T, L, E)), axis=-1)[..., :k]  # uniform random k-subsets, [T, L, k]


@pytest.mark.parametrize(("E", "k"), [(8, 2), (64, 6)])
def test_uniform_routing(E, k):
    tr = make_trace(uniform_ids(np.random.default_rng(0), 3000, 2, E, k), E=E)
    h = rs.usage_entropy_bits(tr)
    assert np.allclose(h, math.log2(E), atol=0.01) and np.all(h <= math.log2(E) + 1e-12)
    assert rs.uniform_entropy_bits(E) == math.log2(E)
    assert np.allclose(rs.reuse_rate(tr), k / E, atol=0.02)
    assert rs.uniform_reuse(k, E) == k / E


def test_perfect_locality_and_sequence_boundaries():
    # two sequences, each always on its own (disjoint) experts: reuse 1, no pair crosses sequences
    ids = np.zeros((10, 3, 2), np.int64)
    ids[:5] = [0, 1]
    ids[5:] = [6, 7]
    tr = make_trace(ids, E=8, seq=[0] * 5 + [1] * 5)
    np.testing.assert_array_equal(rs.reuse_rate(tr), 1.0)
    assert rs.reuse_counts(tr)[1] == 8  # 4 pairs per sequence
    np.testing.assert_allclose(rs.usage_entropy_bits(tr), 2.0)  # four experts equally used
    # prefill tokens are excluded by default: a prefill token with other experts does not count
    ids[0] = [4, 5]
    tr = make_trace(ids, E=8, seq=[0] * 5 + [1] * 5, is_decode=[False] + [True] * 9)
    np.testing.assert_array_equal(rs.reuse_rate(tr), 1.0)
    assert rs.reuse_rate(tr, rs.token_mask(tr, "all"))[0] == pytest.approx(14 / 16)  # 8 pairs, one disjoint


def test_reuse_counts_half_overlap():
    ids = np.array([[[0, 1]], [[1, 2]], [[2, 3]]])  # each token shares one of two experts with the previous
    np.testing.assert_allclose(rs.reuse_rate(make_trace(ids, E=8)), 0.5)


def test_pregate_accuracy_is_one_with_true_future_logits():
    tr = random_trace(np.random.default_rng(2), tokens=40, layers=5, pregate_depth=2, pregate_noise=0.0)
    acc = rs.pregate_accuracy(tr)
    assert sorted(acc) == [1, 2]
    for d, res in acc.items():
        for name in ("topk", "top1_in_topk", "top1_exact"):
            assert np.all(np.isnan(res[name][:d])), (d, name)  # no prediction of layers < d
            np.testing.assert_array_equal(res[name][d:], 1.0)
    noisy = rs.pregate_accuracy(random_trace(np.random.default_rng(2), tokens=40, layers=5, pregate_noise=3.0))
    assert 0.1 < np.nanmean(noisy[1]["topk"]) < 0.9
    assert rs.pregate_accuracy(make_trace(np.zeros((2, 2, 1), np.int64), E=4)) == {}


def test_adapmoe_rule():
    s_l = np.array([1.0])
    w = np.array([[[0.9, 0.1]]])
    assert rs.adapmoe_kept(w, s_l, 0.02)[0, 0] == 1  # tau = 0.141 > 0.1
    assert rs.adapmoe_kept(w, s_l, 0.005)[0, 0] == 2  # tau = 0.071 < 0.1
    assert rs.adapmoe_kept(w * 3, s_l, 0.02)[0, 0] == 1  # weights are renormalised first
    # top-4: drop the lowest weights while their sum stays below tau = sqrt(0.0225) = 0.15
    w4 = np.array([[[0.6, 0.3, 0.06, 0.04]]])
    assert rs.adapmoe_kept(w4, s_l, 0.0225)[0, 0] == 2
    assert rs.adapmoe_kept(w4, s_l, 1e6)[0, 0] == 1  # always at least one expert
    assert rs.adapmoe_kept(w4, np.array([0.0]), 1e-9)[0, 0] == 1  # S_l = 0: free to drop
    assert rs.adapmoe_kept(w4, s_l, 0.0)[0, 0] == 4
    tr = make_trace(np.tile([[[0, 1]], [[2, 3]]], (2, 1, 1)), E=8,
                    weights=np.tile([[[0.9, 0.1]], [[0.5, 0.5]]], (2, 1, 1)))
    share = rs.adapmoe_share(tr, s_l, 0.02)
    assert share["single_share"] == 0.5 and share["executions_saved"] == 0.25


def test_read_sensitivity(tmp_path):
    (tmp_path / "a.txt").write_text("1.5, 2\n3\n")
    (tmp_path / "b.yaml").write_text("S_l: [1, 2, 3]\n")
    (tmp_path / "c.yaml").write_text("sensitivity:\n  S_l: [1, 2, 3]\n")
    (tmp_path / "d.json").write_text("[1, 2, 3]")
    for name in ("a.txt", "b.yaml", "c.yaml", "d.json"):
        assert rs.read_sensitivity(tmp_path / name, 3).shape == (3,)
    with pytest.raises(UserError, match="expected 4 finite numbers"):
        rs.read_sensitivity(tmp_path / "b.yaml", 4)
    (tmp_path / "e.txt").write_text("1 two 3")
    with pytest.raises(UserError, match="expected 3 numbers"):
        rs.read_sensitivity(tmp_path / "e.txt", 3)
    with pytest.raises(UserError, match="not found"):
        rs.read_sensitivity(tmp_path / "nope", 3)


def test_summarize_is_json_ready():
    tr = random_trace(np.random.default_rng(3), tokens=20, layers=3, prefill=4, sequences=2)
    s = rs.summarize(tr, T=(0.01, 0.1))
    json.dumps(s, allow_nan=False)
    assert s["tokens"] == 40 and s["reuse"]["pairs"] == 38
    assert s["pregate"]["1"]["topk"]["by_layer"][0] is None
    assert [t["T"] for t in s["adapmoe"]["thresholds"]] == [0.01, 0.1]
    empty = rs.summarize(tr, phase="prefill", s_l=None)
    assert empty["tokens"] == 8 and empty["adapmoe"]["S_l"] is not None  # S_l from the trace


def test_stats_command(tmp_path, capsys):
    tr = random_trace(np.random.default_rng(4), tokens=30, layers=4, sequences=2)
    write_trace(tr, tmp_path / "t")
    (tmp_path / "s.txt").write_text("1 1 1 1")
    argv = ["stats", f"trace={tmp_path / 't'}", "T=0.001,0.01", f"sensitivity={tmp_path / 's.txt'}",
            f"json={tmp_path / 'out.json'}"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "expert-usage entropy" in out and "uniform random: 0.250" in out and "pre-gating depth 2" in out
    assert "1-exp T=0.01" in out
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["adapmoe"]["S_l"] == [1.0] * 4 and data["sensitivity_source"].endswith("s.txt")
    for bad, msg in [(["stats"], "needs trace="), (["stats", f"trace={tmp_path}/t", "phase=x"], "unknown phase"),
                     (["stats", f"trace={tmp_path}/t", "colour=red"], "unknown key")]:
        assert cli(bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err
