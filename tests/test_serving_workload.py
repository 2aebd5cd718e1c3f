"""Serving workloads (sim/serving/workload.py): requests, arrivals, caps, and every refusal."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from sim.errors import UserError
from sim.runner import load_trace
from sim.serving.workload import WorkloadOptions, check, make_requests, sequences


@pytest.fixture(scope="module")
def toy():
    return load_trace("traces/toy")  # 16 sequences of 64 prompt + 128 decode rows


def fake_trace(lengths: list[tuple[int, int]], seq_ids: list[int] | None = None) -> SimpleNamespace:
    """A trace-like object: per sequence (prompt rows, decode rows), rows ordered by (seq, pos)."""
    seq, pos, dec = [], [], []
    for i, (p, d) in enumerate(lengths):
        sid = seq_ids[i] if seq_ids else i
        seq += [sid] * (p + d)
        pos += list(range(p + d))
        dec += [False] * p + [True] * d
    return SimpleNamespace(seq=np.array(seq, np.int32), pos=np.array(pos, np.int32), is_decode=np.array(dec, bool))


def opts(**kw) -> WorkloadOptions:
    return WorkloadOptions(**{"kind": "open", **kw})


def test_sequences_of_toy(toy):
    seqs = sequences(toy)
    assert [s for s, _, _ in seqs] == list(range(16))
    for s, prompt, decode in seqs:
        assert len(prompt) == 64 and len(decode) == 128
        assert prompt == sorted(prompt) and decode == sorted(decode) and prompt[-1] < decode[0]
        assert (toy.seq[prompt + decode] == s).all()
        assert not toy.is_decode[prompt].any() and toy.is_decode[decode].all()


def test_sequences_in_order_of_first_appearance():
    tr = fake_trace([(1, 2), (0, 3), (2, 1)], seq_ids=[7, 3, 5])
    assert sequences(tr) == [(7, [0], [1, 2]), (3, [], [3, 4, 5]), (5, [6, 7], [8])]


def test_same_seed_same_requests(toy):
    o = opts(rate=5.0, requests=40)
    a = make_requests(o, toy, np.random.default_rng(3))
    b = make_requests(o, toy, np.random.default_rng(3))
    c = make_requests(o, toy, np.random.default_rng(4))
    assert a == b
    assert [r.seq for r in a] != [r.seq for r in c] or [r.arrival_s for r in a] != [r.arrival_s for r in c]


def test_random_order_is_a_permutation_then_with_replacement(toy):
    rng = np.random.default_rng(0)
    perm = make_requests(opts(), toy, rng)  # requests=0: one per sequence
    assert len(perm) == 16 and sorted(r.seq for r in perm) == list(range(16))
    assert [r.seq for r in perm] != list(range(16))  # shuffled (seed 0)
    few = make_requests(opts(requests=5), toy, np.random.default_rng(0))
    assert len({r.seq for r in few}) == 5
    many = make_requests(opts(requests=200), toy, np.random.default_rng(0))
    counts = np.bincount([r.seq for r in many], minlength=16)
    assert len(many) == 200 and counts.max() > 1 and (counts > 0).sum() > 8
    assert [r.rid for r in many] == list(range(200))


def test_trace_order_cycles(toy):
    reqs = make_requests(WorkloadOptions(kind="closed", users=3, order="trace", requests=35), toy,
                         np.random.default_rng(0))
    assert [r.seq for r in reqs] == [i % 16 for i in range(35)]
    assert all(r.arrival_s is None for r in reqs)
    assert [r.user for r in reqs] == [i % 3 for i in range(35)]


def test_request_rows_and_caps(toy):
    full = make_requests(opts(order="trace", requests=2), toy, np.random.default_rng(0))
    _, prompt, decode = sequences(toy)[1]
    assert full[1].prompt_rows == prompt and full[1].decode_rows == decode and full[1].user == -1
    capped = make_requests(opts(order="trace", requests=2, max_prompt=10, max_output=7), toy,
                           np.random.default_rng(0))
    assert capped[1].prompt_rows == prompt[:10] and capped[1].decode_rows == decode[:7]
    big = make_requests(opts(order="trace", requests=1, max_prompt=1000, max_output=1000), toy,
                        np.random.default_rng(0))
    assert len(big[0].prompt_rows) == 64 and len(big[0].decode_rows) == 128


def test_poisson_arrivals(toy):
    rate = 4.0
    reqs = make_requests(opts(rate=rate, requests=2000), toy, np.random.default_rng(11))
    t = np.array([r.arrival_s for r in reqs])
    assert t[0] > 0 and (np.diff(t) >= 0).all()
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.1)


def test_sequences_drawn_before_gaps(toy):
    """The sequence draw does not depend on the kind: open and closed with the same seed agree."""
    o = make_requests(opts(requests=30), toy, np.random.default_rng(5))
    c = make_requests(WorkloadOptions(kind="closed", requests=30), toy, np.random.default_rng(5))
    assert [r.seq for r in o] == [r.seq for r in c]


def test_no_prompt_rows_gives_empty_prompts(toy):
    keep = toy.is_decode
    tr = SimpleNamespace(seq=toy.seq[keep], pos=toy.pos[keep], is_decode=toy.is_decode[keep])
    reqs = make_requests(opts(requests=20), tr, np.random.default_rng(0))
    assert all(r.prompt_rows == [] and len(r.decode_rows) == 128 for r in reqs)


def test_prompt_only_sequences_are_skipped():
    tr = fake_trace([(3, 0), (2, 2), (4, 0)])
    reqs = make_requests(opts(requests=6, order="trace"), tr, np.random.default_rng(0))
    assert {r.seq for r in reqs} == {1}
    with pytest.raises(UserError, match="no sequence with decode"):
        make_requests(opts(), fake_trace([(3, 0)]), np.random.default_rng(0))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_arrivals_file(toy, tmp_path, fmt):
    frame = pl.DataFrame({"arrival_s": [2.0, 0.5, 1.0, 0.5], "prompt_tokens": [1, 5, 0, 500],
                          "output_tokens": [3, 200, 1, 2]})
    path = tmp_path / f"arr.{fmt}"
    frame.write_csv(path) if fmt == "csv" else frame.write_parquet(path)
    reqs = make_requests(opts(arrivals=str(path), order="trace"), toy, np.random.default_rng(0))
    assert [r.arrival_s for r in reqs] == [0.5, 0.5, 1.0, 2.0]  # sorted, ties in file order
    assert [len(r.prompt_rows) for r in reqs] == [5, 64, 0, 1]  # 500 asked, the sequence has 64
    assert [len(r.decode_rows) for r in reqs] == [128, 2, 1, 3]  # 200 asked, the sequence has 128
    assert [r.seq for r in reqs] == [0, 1, 2, 3] and [r.rid for r in reqs] == [0, 1, 2, 3]
    first = make_requests(opts(arrivals=str(path), requests=2, max_output=50), toy, np.random.default_rng(0))
    assert [r.arrival_s for r in first] == [0.5, 0.5] and [len(r.decode_rows) for r in first] == [50, 2]


def test_arrivals_file_without_caps(toy, tmp_path):
    path = tmp_path / "a.csv"
    pl.DataFrame({"arrival_s": [0.0, 3.0]}).write_csv(path)
    reqs = make_requests(opts(arrivals=str(path), max_prompt=4), toy, np.random.default_rng(0))
    assert [len(r.prompt_rows) for r in reqs] == [4, 4] and [len(r.decode_rows) for r in reqs] == [128, 128]


@pytest.mark.parametrize("change, match", [
    (dict(kind="batch"), r"workload\.kind .*'batch'"),
    (dict(rate=0.0), r"workload\.rate .*0\.0"),
    (dict(rate=-1.0), r"workload\.rate .*-1\.0"),
    (dict(rate=float("nan")), r"workload\.rate .*nan"),
    (dict(kind="closed", users=0), r"workload\.users .*0"),
    (dict(think_s=-0.5), r"workload\.think_s .*-0\.5"),
    (dict(requests=-1), r"workload\.requests .*-1"),
    (dict(max_prompt=-2), r"workload\.max_prompt .*-2"),
    (dict(max_output=-3), r"workload\.max_output .*-3"),
    (dict(order="sorted"), r"workload\.order .*'sorted'"),
    (dict(kind="closed", arrivals="a.csv"), r"workload\.arrivals=a\.csv .*'closed'"),
])
def test_check_refuses(change, match):
    with pytest.raises(UserError, match=match):
        check(replace(opts(), **change))


def test_check_accepts_defaults_and_rate_ignored_with_arrivals():
    check(WorkloadOptions())
    check(opts(rate=0.0, arrivals="a.csv"))
    check(WorkloadOptions(kind="closed", rate=0.0))


def test_make_requests_checks_first(toy):
    with pytest.raises(UserError, match=r"workload\.rate"):
        make_requests(opts(rate=0.0), toy, np.random.default_rng(0))


def _write(tmp_path, name: str, frame: pl.DataFrame) -> str:
    path = tmp_path / name
    frame.write_csv(path) if name.endswith(".csv") else frame.write_parquet(path)
    return str(path)


@pytest.mark.parametrize("frame, match", [
    (pl.DataFrame({"t": [1.0]}), r"no column arrival_s \(columns found: t\)"),
    (pl.DataFrame({"arrival_s": [0.0, -1.0, -2.0]}), r"row 2: arrival_s .*-1\.0"),
    (pl.DataFrame({"arrival_s": [0.0, None]}, schema={"arrival_s": pl.Float64}), r"row 2: arrival_s .*null"),
    (pl.DataFrame({"arrival_s": [float("nan")]}), r"row 1: arrival_s .*nan"),
    (pl.DataFrame({"arrival_s": ["1", "x"]}), r"row 2: arrival_s .*'x'"),
    (pl.DataFrame({"arrival_s": [0.0, 1.0], "prompt_tokens": [1, -4]}), r"row 2: prompt_tokens .*-4"),
    (pl.DataFrame({"arrival_s": [0.0, 1.0], "output_tokens": [1.5, 2.0]}), r"row 1: output_tokens .*1\.5"),
    (pl.DataFrame({"arrival_s": [0.0], "output_tokens": [0]}), r"row 1: output_tokens .*>= 1.*0"),
    (pl.DataFrame({"arrival_s": [0.0], "output_tokens": [True]}), r"column output_tokens must hold numbers"),
    (pl.DataFrame({"arrival_s": []}, schema={"arrival_s": pl.Float64}), r"holds no rows"),
])
def test_bad_arrivals_file(toy, tmp_path, frame, match):
    path = _write(tmp_path, "bad.parquet", frame)
    with pytest.raises(UserError, match=match):
        make_requests(opts(arrivals=path), toy, np.random.default_rng(0))


def test_bad_arrivals_csv_row(toy, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("arrival_s,prompt_tokens\n0.5,3\n-0.25,3\n")
    with pytest.raises(UserError, match=r"bad\.csv: row 2: arrival_s .*-0\.25"):
        make_requests(opts(arrivals=str(path)), toy, np.random.default_rng(0))


def test_arrivals_file_fewer_rows_than_requests(toy, tmp_path):
    path = _write(tmp_path, "a.csv", pl.DataFrame({"arrival_s": [0.0, 1.0]}))
    with pytest.raises(UserError, match=r"2 rows, fewer than workload\.requests=3"):
        make_requests(opts(arrivals=path, requests=3), toy, np.random.default_rng(0))


def test_arrivals_file_unusable(toy, tmp_path):
    def refused(path, match):
        with pytest.raises(UserError, match=match):
            make_requests(opts(arrivals=str(path)), toy, np.random.default_rng(0))

    refused(tmp_path / "a.json", r"a\.json: must end in \.csv or \.parquet")
    refused(tmp_path / "missing.csv", r"not found: .*missing\.csv")
    (tmp_path / "dir.csv").mkdir()
    refused(tmp_path / "dir.csv", r"dir\.csv is a folder")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    refused(tmp_path / "junk.parquet", r"junk\.parquet cannot be read")
    (tmp_path / "empty.csv").write_text("")
    refused(tmp_path / "empty.csv", r"empty\.csv")


def test_replay_has_no_requests(toy):
    with pytest.raises(ValueError, match="replay"):
        make_requests(WorkloadOptions(), toy, np.random.default_rng(0))
