"""`python -m sim import`: JSONL / CSV / NPZ routing logs -> traces (sim.trace.importer)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

import sim
from sim.cli import main as cli
from sim.machine.models import load_preset
from sim.trace.format import read_trace
from sim.trace.importer import import_log
from sim.trace.synthetic import random_trace

HUMANEVAL = sim.REPO_ROOT.parent / "shared" / "traces" / "mixtral-8x7b-humaneval" / "routing.jsonl"


def routing(preset: str, tokens: int = 3, sequences: int = 2, seed: int = 0):
    p = load_preset(preset)
    return random_trace(np.random.default_rng(seed), tokens=tokens, sequences=sequences, layers=p.layers,
                        experts=p.experts, top_k=p.top_k, pregate_depth=0)


def records(tr, skip=()):
    """(seq, pos, layer, experts, weights) in layer-major order, as a recorder would log them."""
    T, L, _ = tr.experts.shape
    for layer in range(L):
        for t in range(T):
            if (int(tr.seq[t]), int(tr.pos[t]), layer) not in skip:
                yield int(tr.seq[t]), int(tr.pos[t]), layer, tr.experts[t, layer].tolist(), tr.weights[t, layer].tolist()


def write_jsonl(path: Path, tr, skip=(), keys=("problem_id", "token_idx", "layer", "experts", "gating_probs")):
    with open(path, "w") as fh:
        for rec in records(tr, skip):
            fh.write(json.dumps({"dataset": "x", **dict(zip(keys, rec, strict=True))}) + "\n")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli(["import", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_same_routing(got, want):
    np.testing.assert_array_equal(got.seq, want.seq)
    np.testing.assert_array_equal(got.pos, want.pos)
    np.testing.assert_array_equal(got.experts, want.experts)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-6)
    assert got.is_decode.all()


# ------------------------------------------------------------------------------ good logs


def test_jsonl_mixtral(tmp_path, capsys):
    tr = routing("mixtral-8x7b")
    log = write_jsonl(tmp_path / "log.jsonl", tr)
    rc, out, err = run(capsys, log, "model=mixtral-8x7b", f"out={tmp_path / 't'}")  # format from the extension
    assert (rc, err) == (0, "")
    assert out.count("\n") == 1 and "kept 6 tokens x 32 layers, dropped 0" in out
    got = read_trace(tmp_path / "t")
    assert_same_routing(got, tr)
    assert got.model.name == "mixtral-8x7b" and (got.model.layers, got.model.experts, got.model.top_k) == (32, 8, 2)
    assert got.logits is None and got.pregate == {} and got.sensitivity is None
    assert got.source["fields"]["seq"] == "problem_id" and got.source["tokens_dropped"] == 0


def test_top6_of_64_with_missing_tokens(tmp_path, capsys):
    tr = routing("deepseek-v2-lite", tokens=4)
    skip = {(0, 1, 5), (0, 1, 6), (1, 3, 25)}  # two tokens lose layers
    keys = ("request_id", "position", "layer", "expert_ids", "weights")
    log = write_jsonl(tmp_path / "log.jsonl", tr, skip, keys)
    rc, out, err = run(capsys, log, "format=jsonl", "model=deepseek-v2-lite", f"out={tmp_path / 't'}")
    assert rc == 0 and err == ""
    assert out.count("\n") == 1
    assert "8 tokens: kept 6 tokens x 26 layers, dropped 2 missing from some layers (seq 0: 1, seq 1: 1;" in out
    got = read_trace(tmp_path / "t")
    keep = ~(((tr.seq == 0) & (tr.pos == 1)) | ((tr.seq == 1) & (tr.pos == 3)))
    assert got.experts.shape == (6, 26, 6) and got.experts.max() < 64
    np.testing.assert_array_equal(got.experts, tr.experts[keep])  # nothing shifted between layers
    src = got.source
    assert (src["tokens_seen"], src["tokens_kept"], src["tokens_dropped"]) == (8, 6, 2)
    assert src["per_sequence"] == {0: {"kept": 3, "dropped": 1}, 1: {"kept": 3, "dropped": 1}}
    assert src["dropped_tokens"] == [[0, 1], [1, 3]]
    assert got.model.moe_layer_ids[0] == 1  # one leading dense layer
    # strict refuses, and leaves no folder
    rc, out, err = run(capsys, log, "format=jsonl", "model=deepseek-v2-lite", f"out={tmp_path / 'u'}", "strict=true")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "2 of 8 tokens are missing from some layers (first: seq=0, pos=1 lacks layer(s) [5, 6])" in err
    assert not (tmp_path / "u").exists()


def test_jsonl_explicit_fields_phase_and_labels(tmp_path, capsys):
    tr = routing("mixtral-8x7b", tokens=2, sequences=1)
    with open(tmp_path / "log.jsonl", "w") as fh:
        for s, p, layer, e, w in records(tr):
            fh.write(json.dumps({"req": f"r{s}", "tok": p, "blk": layer, "ids": e, "w": w,
                                 "stage": "prefill" if p == 0 else "decode"}) + "\n\n")
    rc, out, err = run(capsys, tmp_path / "log.jsonl", "model=mixtral-8x7b", f"out={tmp_path / 't'}",
                       "seq_field=req", "pos_field=tok", "layer_field=blk", "experts_field=ids", "weights_field=w")
    assert rc == 0, err
    got = read_trace(tmp_path / "t")
    assert got.is_decode.tolist() == [False, True]
    assert got.source["sequence_labels"] == {0: "r0"}


@pytest.mark.parametrize("layout", ["columns", "lists"])
def test_csv(tmp_path, capsys, layout):
    tr = routing("qwen1.5-moe-a2.7b", tokens=3)  # 24 layers, 60 experts, top-4
    k = tr.model.top_k
    with open(tmp_path / "log.csv", "w") as fh:
        if layout == "columns":
            fh.write("seq,pos,layer," + ",".join(f"expert_{i}" for i in range(k)) + ","
                     + ",".join(f"weight_{i}" for i in range(k)) + "\n")
            for s, p, layer, e, w in records(tr, skip={(1, 2, 0)}):
                fh.write(f"{s},{p},{layer}," + ",".join(map(str, e)) + "," + ",".join(map(repr, w)) + "\n")
        else:
            fh.write("request_id,token_idx,layer,experts,probs\n")
            for s, p, layer, e, w in records(tr, skip={(1, 2, 0)}):
                fh.write(f"{s},{p},{layer},{';'.join(map(str, e))},\"{', '.join(map(repr, w))}\"\n")
    rc, out, err = run(capsys, tmp_path / "log.csv", "model=qwen1.5-moe-a2.7b", f"out={tmp_path / 't'}")
    assert rc == 0, err
    assert "kept 5 tokens x 24 layers, dropped 1" in out
    got = read_trace(tmp_path / "t")
    keep = ~((tr.seq == 1) & (tr.pos == 2))
    np.testing.assert_array_equal(got.experts, tr.experts[keep])
    np.testing.assert_allclose(got.weights, tr.weights[keep], rtol=1e-6)


def test_npz(tmp_path, capsys):
    tr = routing("olmoe-1b-7b", tokens=3)  # 16 layers, 64 experts, top-8
    ex = tr.experts.astype(np.int64)
    ex[4, 7] = -1  # token 4 is missing from layer 7
    np.savez(tmp_path / "log.npz", experts=ex, weights=tr.weights, seq=tr.seq, pos=tr.pos)
    rc, out, err = run(capsys, tmp_path / "log.npz", "format=npz", "model=olmoe-1b-7b", f"out={tmp_path / 't'}")
    assert rc == 0, err
    assert "kept 5 tokens x 16 layers, dropped 1" in out
    got = read_trace(tmp_path / "t")
    np.testing.assert_array_equal(got.experts, tr.experts[np.arange(6) != 4])
    # without seq/pos: one sequence, positions in array order
    np.savez(tmp_path / "bare.npz", experts=tr.experts, weights=tr.weights)
    trace, report = import_log(tmp_path / "bare.npz", "npz", load_preset("olmoe-1b-7b"))
    assert trace.pos.tolist() == list(range(6)) and set(trace.seq.tolist()) == {0}
    assert report.tokens_dropped == 0


# ------------------------------------------------------------------------------- bad logs


def _jsonl(tmp_path: Path, lines: list[str]) -> Path:
    good = json.loads(next(iter(write_jsonl(tmp_path / "good.jsonl", routing("mixtral-8x7b", 1, 1))
                                .read_text().splitlines())))
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(good) + "\n" if line == "GOOD" else line + "\n" for line in lines))
    return path


ROW = '{"problem_id": 0, "token_idx": 5, "layer": 0, "experts": %s, "gating_probs": %s}'


@pytest.mark.parametrize(
    ("lines", "args", "message"),
    [
        (["GOOD"], ["format=parquet"], "unknown format 'parquet'; known: jsonl, csv, npz"),
        (["GOOD"], ["model=mixtral-9x9b"], "unknown model preset 'mixtral-9x9b'; known:"),
        (["GOOD", '{"problem_id": 0, "layer": 1, "experts": [1, 2], "gating_probs": [0.5, 0.5]}'], [],
         "bad.jsonl: line 2: missing field 'token_idx'"),
        (['{"problem_id": 0, "layer": 1, "ids": [1, 2], "gating_probs": [0.5, 0.5], "token_idx": 0}'], [],
         "bad.jsonl: line 1: missing field 'experts' (looked for experts, expert_ids"),
        (["GOOD", "GOOD"[:2] + "{oops"], [], "bad.jsonl: line 2: not valid JSON"),
        (["GOOD", ROW % ("[1, 2]", "[0.5]")], [], "line 2: 'experts' has 2 ids but 'gating_probs' has 1 values"),
        (["GOOD", ROW % ("[1, 2, 3]", "[0.5, 0.3, 0.2]")], [], "line 2: 'experts' has 3 ids, expected 2"),
        ([ROW % ("[1, 2, 3]", "[0.5, 0.3, 0.2]")], [], "the log routes top-3 but model preset 'mixtral-8x7b' has top_k=2"),
        (["GOOD", ROW % ("[1, 8]", "[0.5, 0.5]")], [], "line 2: 'experts' = [1, 8] has an id out of range 0..7"),
        (["GOOD", ROW % ("[1, 1]", "[0.5, 0.5]")], [], "line 2: 'experts' = [1, 1] repeats an expert id"),
        (["GOOD", ROW % ("[1, 2]", "[0.5, -0.5]")], [], "line 2: 'gating_probs' = [0.5, -0.5] has a negative weight"),
        (["GOOD", ROW % ("[1, 2]", '["a", 1]')], [], "line 2: field 'gating_probs' must hold numbers"),
        (["GOOD", ROW.replace('"layer": 0', '"layer": 32') % ("[1, 2]", "[0.5, 0.5]")], [],
         "line 2: 'layer' = 32 is out of range 0..31"),
        (["GOOD", "GOOD"], [], "line 2: (seq, pos, layer) = (0, 0, 0) repeats"),
        (["GOOD"], ["seq_field=nope"], "no field 'nope' (given as seq_field)"),
        ([], [], "the file holds no records"),
        (["GOOD"], ["strict=maybe"], "bad value for 'strict'"),
    ],
)
def test_bad_jsonl(tmp_path, capsys, lines, args, message):
    log = _jsonl(tmp_path, lines)
    rc, out, err = run(capsys, log, "model=mixtral-8x7b", f"out={tmp_path / 'out'}", *args)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert message in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder either


def test_bad_files(tmp_path, capsys):
    out = f"out={tmp_path / 'out'}"
    rc, _, err = run(capsys, tmp_path / "nope.jsonl", "model=mixtral-8x7b", out)
    assert rc == 2 and "import file not found" in err
    (tmp_path / "log.bin").write_bytes(b"\x00\xff" * 10)
    rc, _, err = run(capsys, tmp_path / "log.bin", "model=mixtral-8x7b", out)
    assert rc == 2 and "cannot tell the format of log.bin; known: jsonl, csv, npz" in err
    rc, _, err = run(capsys, tmp_path / "log.bin", "format=jsonl", "model=mixtral-8x7b", out)
    assert rc == 2 and "line 1: not UTF-8 text" in err
    rc, _, err = run(capsys, tmp_path / "log.bin", "format=npz", "model=mixtral-8x7b", out)
    assert rc == 2 and "is not an .npz file (not a zip archive" in err
    (tmp_path / "log.csv").write_text("seq,pos,layer,experts,weights\n0,0,0,1;2\n")
    rc, _, err = run(capsys, tmp_path / "log.csv", "model=mixtral-8x7b", out)
    assert rc == 2 and "log.csv: line 2: 4 fields, the header has 5" in err
    (tmp_path / "log.csv").write_text("seq,pos,layer,experts,weights\n0,0,,1;2,0.5;0.5\n")
    rc, _, err = run(capsys, tmp_path / "log.csv", "model=mixtral-8x7b", out)
    assert rc == 2 and "log.csv: line 2: field 'layer' is empty" in err
    np.savez(tmp_path / "log.npz", experts=np.zeros((2, 32, 2), np.int64), weights=np.zeros((2, 32, 3)))
    rc, _, err = run(capsys, tmp_path / "log.npz", "model=mixtral-8x7b", out)
    assert rc == 2 and "differ in shape" in err
    np.savez(tmp_path / "log.npz", experts=np.tile([0, 1], (2, 16, 1)), weights=np.full((2, 16, 2), 0.5))
    rc, _, err = run(capsys, tmp_path / "log.npz", "model=mixtral-8x7b", out)
    assert rc == 2 and "no token is present in all 32 layers" in err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    rc, _, err = run(capsys, _jsonl(tmp_path, ["GOOD"]), "model=mixtral-8x7b", out)
    assert rc == 2 and "already exists" in err and (tmp_path / "out" / "x").read_text() == "keep me"
    assert len([line for line in err.splitlines() if line]) == 1


# ----------------------------------------------------------------------- the real Mixtral log


def test_humaneval_log(tmp_path, capsys):
    if not HUMANEVAL.is_file():
        pytest.skip(f"shared Mixtral HumanEval log not present ({HUMANEVAL.name})")
    rc, out, err = run(capsys, HUMANEVAL, "format=jsonl", "model=mixtral-8x7b", f"out={tmp_path / 'he'}")
    assert rc == 0, err
    assert out.count("\n") == 1 and "kept 333 tokens x 32 layers, dropped 5" in out
    tr = read_trace(tmp_path / "he")
    assert tr.experts.shape == (333, 32, 2) and tr.num_decode == 333
    assert meta_source(tmp_path / "he")["tokens_dropped"] == 5
    assert_not_committed(HUMANEVAL)


def meta_source(folder: Path) -> dict:
    return yaml.safe_load((folder / "meta.yaml").read_text())["source"]


def assert_not_committed(data: Path) -> None:
    """No committed file is, contains, or was derived from the shared (unlicensed) log."""
    git = shutil.which("git")
    if git is None or not (sim.REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run([git, "ls-files"], cwd=sim.REPO_ROOT, capture_output=True, text=True, check=True)
    assert "humaneval" not in files.stdout.lower()
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    sample = json.loads(data.read_text().splitlines()[0])["gating_probs"][0]
    for needle in (digest, repr(sample)):  # the file's hash (in an imported meta.yaml) or one of its numbers
        found = subprocess.run([git, "grep", "-l", "-F", needle], cwd=sim.REPO_ROOT, capture_output=True, text=True)
        assert found.stdout == "", f"committed files derive from the shared log: {found.stdout.split()}"
    for name in files.stdout.split():
        if name.endswith((".jsonl", ".parquet", ".npz")):
            path = sim.REPO_ROOT / name
            assert not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest, name
