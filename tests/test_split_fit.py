"""`python -m sim split` (sim/trace/split.py) and the rule of `policies/fit.py`: a learned policy is
fitted on one trace and never evaluated on it."""

from __future__ import annotations

import numpy as np
import pytest

from policies.fit import fit_trace
from sim.cli import main as cli
from sim.errors import UserError
from sim.trace.format import read_trace, write_trace
from sim.trace.split import split_trace
from sim.trace.synthetic import random_trace
from tests.test_policy_units import ctx_for


def _trace(sequences=3, tokens=10, prefill=2):
    return random_trace(np.random.default_rng(0), tokens=tokens, layers=2, experts=4, prefill=prefill,
                        sequences=sequences)


def test_by_position_splits_every_sequence_in_time():
    tr = _trace()  # 3 sequences of 12 tokens (2 prompt, 10 decode)
    fit, test = split_trace(tr, 0.5, "position")
    assert fit.num_tokens == test.num_tokens == 18  # 6 + 6 per sequence
    for s in range(3):
        assert fit.pos[fit.seq == s].tolist() == list(range(6))
        assert test.pos[test.seq == s].tolist() == list(range(6, 12))  # positions kept as recorded
    both = np.concatenate([fit.experts, test.experts])
    assert sorted(map(bytes, both)) == sorted(map(bytes, tr.experts))  # nothing lost, nothing twice
    assert fit.source["split"]["of"] == test.source["split"]["of"] == tr.checksum()


def test_by_sequence_gives_whole_sequences_and_refuses_an_empty_part():
    tr = _trace()
    fit, test = split_trace(tr, 0.34, "sequence")  # round(0.34 * 3) = 1 sequence fits
    assert set(fit.seq.tolist()) == {0} and set(test.seq.tolist()) == {1, 2}
    with pytest.raises(UserError, match="leaves a part empty"):
        split_trace(_trace(sequences=1), 0.5, "sequence")
    with pytest.raises(UserError, match=r"fraction must be in \(0, 1\)"):
        split_trace(tr, 1.0, "position")


def test_the_command_writes_two_traces_and_bad_input_writes_nothing(tmp_path, capsys):
    src = write_trace(_trace(), tmp_path / "src")
    a, b = tmp_path / "fit", tmp_path / "test"
    assert cli(["split", f"trace={src}", f"out={a},{b}"]) == 0
    assert read_trace(a).num_tokens + read_trace(b).num_tokens == 36
    capsys.readouterr()
    assert cli(["split", f"trace={src}", f"out={tmp_path / 'x'},{tmp_path / 'y'}", "by=token"]) == 2
    assert cli(["split", f"trace={src}", f"out={tmp_path / 'x'}"]) == 2
    assert "two different folders" in capsys.readouterr().err
    assert cli(["split", f"trace={src}", f"out={a},{tmp_path / 'y'}"]) == 2  # `a` exists: neither is written
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_fit_refuses_the_replayed_trace_and_its_whole(tmp_path):
    tr = _trace()
    whole = write_trace(tr, tmp_path / "whole")
    fit, test = split_trace(tr, 0.5, "position")
    fit_dir = write_trace(fit, tmp_path / "fit")
    assert fit_trace(str(fit_dir), ctx_for(test), "cache.fit").num_tokens == 18
    for refused, replayed in ((str(whole), test), (str(fit_dir), fit), (str(fit_dir), tr)):
        with pytest.raises(UserError, match="never evaluated on what it was fitted on"):
            fit_trace(refused, ctx_for(replayed), "cache.fit")
    other = write_trace(random_trace(np.random.default_rng(1), tokens=4, layers=3, experts=4), tmp_path / "other")
    with pytest.raises(UserError, match="cache.fit=.*3 layers"):
        fit_trace(str(other), ctx_for(test), "cache.fit")
    with pytest.raises(UserError, match="cache.fit needs a profile trace"):
        fit_trace("", ctx_for(test), "cache.fit")


def test_fit_refuses_overlapping_parts_of_nested_and_different_splits(tmp_path):
    tr = _trace()  # 3 sequences x 12 rows
    whole = write_trace(tr, tmp_path / "whole")
    fit7, _ = split_trace(tr, 0.7, "position")  # rows 0-7 of each sequence (round(0.7 * 12) = 8)
    _, test5 = split_trace(tr, 0.5, "position")  # rows 6-11: rows 6 and 7 are in both
    inner_fit, inner_test = split_trace(test5, 0.5, "position")  # a split of a split: root is still `tr`
    assert inner_test.source["split"]["root"] == tr.checksum() and inner_test.source["split"]["of"] == test5.checksum()
    fit7_dir = write_trace(fit7, tmp_path / "fit7")
    for fit_dir, replayed in ((fit7_dir, test5), (whole, inner_test), (write_trace(test5, tmp_path / "t5"), inner_test)):
        with pytest.raises(UserError, match="shares rows with the replayed trace"):
            fit_trace(str(fit_dir), ctx_for(replayed), "cache.fit")
    # disjoint parts of one root are fine, however they were split
    first3, _ = split_trace(tr, 0.25, "position")  # rows 0-2 of each sequence
    assert fit_trace(str(write_trace(first3, tmp_path / "f3")), ctx_for(inner_test), "cache.fit").num_tokens == 9
    with pytest.raises(UserError, match=r"cache.fit=/nonexistent/x: .*not found"):
        fit_trace("/nonexistent/x", ctx_for(test5), "cache.fit")
