"""Trace format v1 (traces/README.md): round trip, checksum, and every refusal names the row."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from sim.cli import main as cli
from sim.errors import UserError
from sim.trace.format import META_FILE, ROUTING_FILE, meta_dict, read_trace, to_frame, write_trace
from sim.trace.synthetic import random_trace


@pytest.fixture
def trace():
    return random_trace(np.random.default_rng(1), tokens=5, layers=3, prefill=2, sequences=2, pregate_depth=2)


def test_round_trip(trace, tmp_path):
    write_trace(trace, tmp_path / "t")
    back = read_trace(tmp_path / "t")
    assert back.model == trace.model
    for name in ("seq", "pos", "is_decode", "experts", "weights", "logits", "fisher"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name), err_msg=name)
    assert back.experts.dtype == np.int16 and back.weights.dtype == np.float32
    assert back.experts.shape == (14, 3, 2) and back.logits.shape == (14, 3, 8)
    assert sorted(back.pregate) == [1, 2]
    for d in (1, 2):
        np.testing.assert_array_equal(back.pregate[d], trace.pregate[d])
    np.testing.assert_allclose(back.sensitivity, trace.sensitivity)
    assert back.checksum() == trace.checksum()
    meta = yaml.safe_load((tmp_path / "t" / META_FILE).read_text())
    assert meta["counts"] == {"sequences": 2, "tokens": 14, "prefill_tokens": 4, "decode_tokens": 10}
    assert meta["checksum"] == trace.checksum()


def test_checksum_stable_and_content_sensitive(trace):
    again = random_trace(np.random.default_rng(1), tokens=5, layers=3, prefill=2, sequences=2, pregate_depth=2)
    assert again.checksum() == trace.checksum()
    assert trace.checksum().startswith("sha256:") and len(trace.checksum()) == 7 + 64
    again.weights[3, 1, 0] += 1e-3
    assert again.checksum() != trace.checksum()
    again = random_trace(np.random.default_rng(1), tokens=5, layers=3, prefill=2, sequences=2, pregate_depth=2)
    again.experts[0, 0] = again.experts[0, 0, ::-1]
    assert again.checksum() != trace.checksum()


def test_checksum_follows_the_spec(trace, tmp_path):
    """Recompute the checksum from routing.parquet as traces/README.md section 4 defines it."""
    write_trace(trace, tmp_path / "t")
    f = pl.read_parquet(tmp_path / "t" / ROUTING_FILE).sample(fraction=1.0, shuffle=True, seed=0)
    f = f.sort("seq", "pos", "layer")  # canonical order whatever the file's row order
    T, L = f.height // 3, 3
    first = f.filter(pl.col("layer") == 0)

    def dense(col: str, dtype: str) -> np.ndarray:
        return np.stack(f[col].to_list()).astype(dtype).reshape(T, L, -1)

    arrays = [
        ("seq", first["seq"].to_numpy().astype("<i4")),
        ("pos", first["pos"].to_numpy().astype("<i4")),
        ("is_decode", (first["phase"] == "decode").to_numpy().astype(bool)),
        ("experts", dense("experts", "<i2")),
        ("weights", dense("weights", "<f4")),
        ("logits", dense("logits", "<f4")),
        ("pregate_1", dense("pregate_1", "<f4")),
        ("pregate_2", dense("pregate_2", "<f4")),
        ("fisher", f["fisher"].to_numpy().astype("<f4").reshape(T, L)),
    ]
    h = hashlib.sha256()
    for name, a in arrays:
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    meta = yaml.safe_load((tmp_path / "t" / META_FILE).read_text())
    assert meta["checksum"] == "sha256:" + h.hexdigest()


def test_edited_parquet_fails_checksum(trace, tmp_path):
    write_trace(trace, tmp_path / "t")
    frame = pl.read_parquet(tmp_path / "t" / ROUTING_FILE)
    frame.with_columns(fisher=pl.col("fisher") * 2).write_parquet(tmp_path / "t" / ROUTING_FILE)
    with pytest.raises(UserError, match="checksum mismatch"):
        read_trace(tmp_path / "t")


# ------------------------------------------------------------------------- bad traces


def _write(tmp_path: Path, trace, frame: pl.DataFrame | None = None, **meta_edits) -> Path:
    """A trace folder with `frame` as its routing and meta.yaml edited (no checksum)."""
    out = tmp_path / "bad"
    out.mkdir(exist_ok=True)
    meta = meta_dict(trace)
    meta.pop("checksum")
    for key, value in meta_edits.items():
        section, _, name = key.partition("__")
        if name:
            meta[section][name] = value
        else:
            meta[section] = value
    (out / META_FILE).write_text(yaml.safe_dump(meta))
    (frame if frame is not None else to_frame(trace)).write_parquet(out / ROUTING_FILE)
    return out


def _set(frame: pl.DataFrame, row: int, column: str, value) -> pl.DataFrame:
    data = frame.to_dict(as_series=False)
    data[column][row] = value
    return pl.DataFrame(data, schema=frame.schema)


def _frame(trace) -> pl.DataFrame:
    return to_frame(trace)


@pytest.mark.parametrize(
    ("row", "column", "value", "message"),
    [
        (5, "experts", [0, 99], "expert id out of range 0..7"),
        (7, "experts", [3, 3], "duplicate expert ids"),
        (2, "weights", [float("nan"), 0.5], "weights must be finite"),
        (3, "weights", [-0.1, 1.1], "weights must be non-negative"),
        (4, "logits", [float("nan")] + [0.0] * 7, "logits must be finite"),
        (6, "experts", [1, 2, 3], "experts must hold 2 values"),
        (8, "phase", "generate", "phase must be one of"),
    ],
)
def test_bad_row_is_named(trace, tmp_path, row, column, value, message):
    folder = _write(tmp_path, trace, _set(_frame(trace), row, column, value))
    with pytest.raises(UserError, match=message) as err:
        read_trace(folder)
    r = _frame(trace).row(row, named=True)
    assert f"row {row} (seq={r['seq']}, pos={r['pos']}, layer={r['layer']})" in str(err.value)


def test_token_missing_from_a_layer(trace, tmp_path):
    frame = _frame(trace)
    gone = frame.row(4, named=True)  # (seq 0, pos 1, layer 1)
    folder = _write(tmp_path, trace, frame.with_row_index("i").filter(pl.col("i") != 4).drop("i"))
    with pytest.raises(UserError, match=rf"token \(seq={gone['seq']}, pos={gone['pos']}\) is missing from layer\(s\) \[1\]"):
        read_trace(folder)


def test_duplicate_row(trace, tmp_path):
    frame = _frame(trace)
    folder = _write(tmp_path, trace, pl.concat([frame, frame.slice(3, 1)]))
    with pytest.raises(UserError, match=r"row \d+ .*appears more than once"):
        read_trace(folder)


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"model__experts": 6}, r"row \d+ .*: expert id out of range 0..5"),
        ({"model__top_k": 3}, r"row 0 .*: experts must hold 3 values"),
        ({"model__layers": 2}, r"row 2 .*: layer out of range 0..1"),
        ({"model__layers": 4}, r"missing from layer\(s\) \[3\]"),
        ({"format_version": 2}, "format_version 2 is not supported"),
        ({"format_version": None}, "format_version None is not supported"),
        ({"model": "mixtral"}, "'model' section"),
        ({"model__layers": "three"}, r"model.layers.*must be an integer"),
        ({"model__layers": 32.7}, r"model.layers.*whole number"),
        ({"model__top_k": "2"}, r"model.top_k.*'2' \(str\)"),
        ({"model__renormalize": "yes please"}, r"model.renormalize.*true or false"),
        ({"sensitivity__S_l": ["oops", 1.0, 2.0]}, r"sensitivity.S_l\[0\].*'oops'"),
        ({"model__colour": "red"}, r"unknown model field\(s\) \['colour'\]"),
        ({"sensitivity__S_l": [1.0, 2.0]}, "sensitivity.S_l must be a list of 3"),
    ],
)
def test_meta_mismatch(trace, tmp_path, edits, message):
    with pytest.raises(UserError, match=message):
        read_trace(_write(tmp_path, trace, **edits))


def test_corrupt_parquet(trace, tmp_path):
    folder = _write(tmp_path, trace)
    (folder / ROUTING_FILE).write_bytes(b"\x00garbage\xff" * 50)
    with pytest.raises(UserError, match="corrupt or not Parquet"):
        read_trace(folder)
    raw = to_frame(trace)
    raw.write_parquet(folder / ROUTING_FILE)
    data = (folder / ROUTING_FILE).read_bytes()
    (folder / ROUTING_FILE).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(UserError, match="corrupt or not Parquet"):
        read_trace(folder)


def test_missing_pieces(trace, tmp_path):
    with pytest.raises(UserError, match="trace folder not found"):
        read_trace(tmp_path / "nope")
    folder = _write(tmp_path, trace)
    (folder / ROUTING_FILE).unlink()
    with pytest.raises(UserError, match="routing.parquet is missing"):
        read_trace(folder)
    (folder / META_FILE).write_text("model: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        read_trace(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.head(0), "the trace has no rows"),
        (lambda f: f.drop("weights"), "required column 'weights' is missing"),
        (lambda f: f.with_columns(pos=pl.col("pos").cast(pl.Float64)), "column 'pos' must be integer"),
        (lambda f: f.with_columns(token_id=pl.lit("a")), "column 'token_id' must be integer"),
        (lambda f: f.with_columns(fisher=pl.lit("x")), "column 'fisher' must be numeric"),
        (lambda f: f.rename({"pregate_1": "pregate_0"}), "unknown column 'pregate_0'"),
        (lambda f: f.with_columns(experts=pl.col("experts").cast(pl.List(pl.Float64)) + 0.5),
         "'experts' must hold integers"),
        (lambda f: f.with_columns(pos=pl.col("pos") - 3), r"row \d+ .*seq and pos must be >= 0"),
    ],
)
def test_bad_columns(trace, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        read_trace(_write(tmp_path, trace, change(_frame(trace))))


def test_cli_refuses_bad_trace_in_one_line(trace, tmp_path, capsys):
    folder = _write(tmp_path, trace, _set(_frame(trace), 5, "experts", [0, 99]))
    assert cli(["stats", f"trace={folder}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert "row 5" in err
    (folder / ROUTING_FILE).write_bytes(b"garbage")
    assert cli(["stats", f"trace={folder}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt or not Parquet" in err


def test_write_is_atomic_and_refuses_existing(trace, tmp_path):
    write_trace(trace, tmp_path / "t")
    with pytest.raises(UserError, match="already exists"):
        write_trace(trace, tmp_path / "t")
    trace.weights[0, 0, 0] = np.nan
    with pytest.raises(UserError, match="weights must be finite"):
        write_trace(trace, tmp_path / "u")
    assert not (tmp_path / "u").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
