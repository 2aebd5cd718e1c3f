"""Trace format v1: reader, writer and validation (spec: `traces/README.md`).

A trace is a folder with `meta.yaml` and `routing.parquet` (one row per (seq, pos, layer)). In
memory a `Trace` is dense numpy, built once at load, which is what the engine replays:

    experts  [T, L, k] int16    expert ids in rank order
    weights  [T, L, k] float32  their (renormalised) gating weights
    logits   [T, L, E] float32  full router logits (optional)
    pregate  {d: [T, L, E]}     router of layer l+d applied to layer l's MoE input (optional)
    fisher   [T, L]    float32  per-token Fisher sensitivity (optional)
    seq, pos [T] int32; is_decode [T] bool; token_id [T] int32 (optional)

T = tokens ordered by (seq, pos), L = MoE layers, k = top-k, E = routed experts per layer.
Loading refuses a bad trace with a `UserError` naming the first bad row; nothing is guessed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml

from sim import atomic
from sim.errors import UserError

FORMAT_VERSION = 1
META_FILE = "meta.yaml"
ROUTING_FILE = "routing.parquet"
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class ModelInfo:
    """The routing shape of the traced model (`meta.yaml: model`)."""

    name: str
    layers: int  # MoE layers (the trace's `layer` is 0..layers-1)
    experts: int  # routed experts per MoE layer
    top_k: int
    hidden: int = 0
    expert_width: int = 0
    shared_experts: int = 0
    shared_expert_width: int = 0
    dense_layers: int = 0  # decoder layers with a dense MLP instead of an MoE block
    moe_layer_ids: tuple[int, ...] = ()  # decoder-layer index of each MoE layer
    dtype: str = "unknown"
    routing: str = "softmax_topk"  # how ids/weights come from logits (see traces/README.md)
    renormalize: bool = True

    def __post_init__(self) -> None:
        for name in ("layers", "experts", "top_k"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"meta.yaml: model.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.experts:
            raise UserError(f"meta.yaml: model.top_k={self.top_k} exceeds model.experts={self.experts}")
        object.__setattr__(self, "moe_layer_ids", tuple(int(i) for i in self.moe_layer_ids))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "meta.yaml") -> ModelInfo:
        """The `model` section of a meta.yaml, every field of its type and in range (sim/validate.py)."""
        from sim.validate import META_MODEL, check_record

        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(map(str, data)) - set(names))
        if unknown:
            raise UserError(f"{where}: unknown model field(s) {unknown}; valid: {sorted(names)}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise UserError(f"{where}: model.{missing[0]} is missing (required: {', '.join(required)})")
        values = check_record(cls, data, META_MODEL, where, section="model")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["moe_layer_ids"] = list(self.moe_layer_ids)
        return d


@dataclass
class Trace:
    """A routing trace held as dense arrays (see the module docstring for shapes)."""

    model: ModelInfo
    seq: np.ndarray
    pos: np.ndarray
    is_decode: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    logits: np.ndarray | None = None
    pregate: dict[int, np.ndarray] = field(default_factory=dict)
    fisher: np.ndarray | None = None
    token_id: np.ndarray | None = None
    sensitivity: np.ndarray | None = None  # [L] S_l
    sensitivity_info: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_decode(self) -> int:
        return int(self.is_decode.sum())

    def checksum(self) -> str:
        """sha256 over the routing content in canonical order (independent of file encoding).

        Arrays are hashed little-endian whatever the machine (spec: traces/README.md).
        """
        h = hashlib.sha256()
        for name, arr in self._columns():
            a = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
        return "sha256:" + h.hexdigest()

    def _columns(self) -> list[tuple[str, np.ndarray]]:
        cols = [
            ("seq", self.seq.astype(np.int32)),
            ("pos", self.pos.astype(np.int32)),
            ("is_decode", self.is_decode.astype(np.bool_)),
            ("experts", self.experts.astype(np.int16)),
            ("weights", self.weights.astype(np.float32)),
        ]
        if self.logits is not None:
            cols.append(("logits", self.logits.astype(np.float32)))
        for d in sorted(self.pregate):
            cols.append((f"pregate_{d}", self.pregate[d].astype(np.float32)))
        if self.fisher is not None:
            cols.append(("fisher", self.fisher.astype(np.float32)))
        if self.token_id is not None:
            cols.append(("token_id", self.token_id.astype(np.int32)))
        return cols

    def check_shapes(self) -> None:
        """Invariant check of the in-memory arrays; raises ValueError (a programming error)."""
        T, L, k, E = self.num_tokens, self.model.layers, self.model.top_k, self.model.experts
        expect = {"seq": (T,), "pos": (T,), "is_decode": (T,), "experts": (T, L, k), "weights": (T, L, k)}
        for name, shape in expect.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"Trace.{name} has shape {getattr(self, name).shape}, expected {shape}")
        for name, arr in [("logits", self.logits)] + [(f"pregate_{d}", a) for d, a in self.pregate.items()]:
            if arr is not None and arr.shape != (T, L, E):
                raise ValueError(f"Trace.{name} has shape {arr.shape}, expected {(T, L, E)}")
        if self.fisher is not None and self.fisher.shape != (T, L):
            raise ValueError(f"Trace.fisher has shape {self.fisher.shape}, expected {(T, L)}")


# ----------------------------------------------------------------------------------------- write


def to_frame(trace: Trace) -> pl.DataFrame:
    """The long (tidy) form: one row per (seq, pos, layer), sorted."""
    trace.check_shapes()
    T, L = trace.num_tokens, trace.model.layers
    rep = lambda a: np.repeat(a, L)  # noqa: E731  [T] -> [T*L]
    cols: dict[str, Any] = {
        "seq": pl.Series(rep(trace.seq).astype(np.int32)),
        "pos": pl.Series(rep(trace.pos).astype(np.int32)),
        "phase": pl.Series(np.where(rep(trace.is_decode), "decode", "prefill")),
        "layer": pl.Series(np.tile(np.arange(L, dtype=np.int16), T)),
        "experts": _list_col(trace.experts.astype(np.int16)),
        "weights": _list_col(trace.weights.astype(np.float32)),
    }
    if trace.token_id is not None:
        cols["token_id"] = pl.Series(rep(trace.token_id).astype(np.int32))
    if trace.logits is not None:
        cols["logits"] = _list_col(trace.logits.astype(np.float32))
    for d in sorted(trace.pregate):
        cols[f"pregate_{d}"] = _list_col(trace.pregate[d].astype(np.float32))
    if trace.fisher is not None:
        cols["fisher"] = pl.Series(trace.fisher.reshape(-1).astype(np.float32))
    return pl.DataFrame(cols)


def _list_col(arr: np.ndarray) -> pl.Series:
    """[T, L, n] -> a List column of T*L rows."""
    flat = arr.reshape(-1, arr.shape[-1])
    series = pl.Series(flat)  # Array(dtype, n)
    return series.cast(pl.List(series.dtype.inner))


def meta_dict(trace: Trace) -> dict[str, Any]:
    sens = dict(trace.sensitivity_info)
    sens["S_l"] = None if trace.sensitivity is None else [float(x) for x in trace.sensitivity]
    source = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **trace.source}
    return {
        "format_version": FORMAT_VERSION,
        "model": trace.model.to_dict(),
        "sensitivity": sens,
        "source": source,
        "counts": {
            "sequences": int(len(np.unique(trace.seq))),
            "tokens": trace.num_tokens,
            "prefill_tokens": int(trace.num_tokens - trace.num_decode),
            "decode_tokens": trace.num_decode,
        },
        "columns": list(to_frame_columns(trace)),
        "checksum": trace.checksum(),
    }


def to_frame_columns(trace: Trace) -> list[str]:
    cols = ["seq", "pos", "phase", "layer", "experts", "weights"]
    cols += ["token_id"] if trace.token_id is not None else []
    cols += ["logits"] if trace.logits is not None else []
    cols += [f"pregate_{d}" for d in sorted(trace.pregate)]
    cols += ["fisher"] if trace.fisher is not None else []
    return cols


def write_trace(trace: Trace, out: Path, *, overwrite: bool = False) -> Path:
    """Write `trace` to the folder `out` atomically (a failure leaves nothing behind)."""
    with atomic.new_dir(Path(out), overwrite=overwrite) as tmp:
        fill_trace(trace, tmp)
    return Path(out)


def fill_trace(trace: Trace, tmp: Path) -> None:
    """Write `trace`'s files into `tmp`, the temporary folder of a claimed output (`atomic.new_dir`)."""
    validate(trace)
    frame = to_frame(trace)
    meta = meta_dict(trace)
    frame.write_parquet(tmp / ROUTING_FILE, compression="zstd", statistics=False)
    (tmp / META_FILE).write_text(yaml.safe_dump(meta, sort_keys=False, width=100, default_flow_style=None))


# ------------------------------------------------------------------------------------------ read


def read_trace(path: Path | str) -> Trace:
    """Load and validate a trace folder. Raises UserError naming the first problem."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"trace folder not found: {path}")
    meta = _read_meta(path)
    model = ModelInfo.from_dict(meta["model"], where=str(path / META_FILE))
    frame = _read_frame(path / ROUTING_FILE)
    trace = from_frame(frame, model, where=str(path / ROUTING_FILE))
    sens = meta.get("sensitivity") or {}
    s_l = sens.get("S_l")  # `sensitivity` and `source` are known to be mappings (_read_meta)
    if s_l is not None:
        from sim.validate import check_number

        where = str(path / META_FILE)
        if not isinstance(s_l, list) or len(s_l) != model.layers:
            raise UserError(f"{where}: sensitivity.S_l must be a list of {model.layers} numbers (one per MoE "
                            f"layer), got {str(s_l)[:60]!r}")
        trace.sensitivity = np.asarray([check_number(x, f"sensitivity.S_l[{i}]", where=where)
                                        for i, x in enumerate(s_l)], dtype=np.float64)
    trace.sensitivity_info = {k: v for k, v in sens.items() if k != "S_l"}
    trace.source = dict(meta.get("source") or {})
    trace.path = path
    want = meta.get("checksum")
    if want is not None and want != trace.checksum():
        raise UserError(f"{path}: checksum mismatch: routing.parquet does not match meta.yaml (edited or corrupt)")
    return trace


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{path} is not a trace: {META_FILE} is missing")
    from sim.errors import read_text

    text = read_text(meta_path, "trace metadata")
    try:
        meta = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{meta_path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise UserError(f"{meta_path}: expected a mapping with a 'model' section (itself a mapping)")
    for name in ("sensitivity", "source"):
        if not isinstance(meta.get(name) or {}, dict):
            raise UserError(f"{meta_path}: '{name}' must be a mapping, is {type(meta[name]).__name__}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{meta_path}: format_version {version!r} is not supported (this reads {FORMAT_VERSION})")
    return meta


def _read_frame(file: Path) -> pl.DataFrame:
    if not file.is_file():
        raise UserError(f"{file} is missing")
    try:
        return pl.read_parquet(file)
    # polars raises several types for a damaged file; a Rust panic is a BaseException
    except (Exception, pl.exceptions.PanicException) as err:
        raise UserError(f"{file} is corrupt or not Parquet: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    """A library error as one short line (UserErrors are printed on one line)."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[0][:200]


def from_frame(frame: pl.DataFrame, model: ModelInfo, *, where: str = "routing.parquet") -> Trace:
    """Validate the long form and build the dense `Trace`."""
    L, k, E = model.layers, model.top_k, model.experts
    for name in ("seq", "pos", "phase", "layer", "experts", "weights"):
        if name not in frame.columns:
            raise UserError(f"{where}: required column {name!r} is missing (has {frame.columns})")
    for name in ("seq", "pos", "layer", "token_id"):
        if name in frame.columns and not frame[name].dtype.is_integer():
            raise UserError(f"{where}: column {name!r} must be integer, is {frame[name].dtype}")
    if "fisher" in frame.columns and not frame["fisher"].dtype.is_numeric():
        raise UserError(f"{where}: column 'fisher' must be numeric, is {frame['fisher'].dtype}")
    if frame.height == 0:
        raise UserError(f"{where}: the trace has no rows")
    frame = frame.with_row_index("_row")

    def bad(mask: pl.Series | np.ndarray, what: str) -> None:
        mask = pl.Series(np.asarray(mask, dtype=bool)) if isinstance(mask, np.ndarray) else mask
        if mask.any():
            r = frame.filter(mask).row(0, named=True)
            raise UserError(f"{where}: row {r['_row']} (seq={r['seq']}, pos={r['pos']}, layer={r['layer']}): {what}")

    for name in frame.columns:
        if frame[name].null_count():
            bad(frame[name].is_null(), f"column {name!r} is null")
    bad(~frame["phase"].cast(pl.String).is_in(PHASES), f"phase must be one of {PHASES}")
    bad((frame["layer"] < 0) | (frame["layer"] >= L), f"layer out of range 0..{L - 1}")
    bad((frame["seq"] < 0) | (frame["pos"] < 0), "seq and pos must be >= 0")

    experts = _dense_list(frame, "experts", k, bad, np.int64, where)
    weights = _dense_list(frame, "weights", k, bad, np.float64, where)
    bad((experts < 0).any(1) | (experts >= E).any(1), f"expert id out of range 0..{E - 1}")
    srt = np.sort(experts, axis=1)
    bad((srt[:, 1:] == srt[:, :-1]).any(1), "duplicate expert ids in one row")
    bad(~np.isfinite(weights).all(1), "weights must be finite (found NaN or inf)")
    bad((weights < 0).any(1), "weights must be non-negative")
    extra: dict[str, np.ndarray] = {}
    for name in frame.columns:
        if name == "logits" or name.startswith("pregate_"):
            depth = name[len("pregate_") :]
            if name != "logits" and not (depth.isdigit() and int(depth) >= 1):
                raise UserError(f"{where}: unknown column {name!r} (pre-gating columns are pregate_1, pregate_2, ...)")
            arr = _dense_list(frame, name, E, bad, np.float32, where)
            bad(~np.isfinite(arr).all(1), f"{name} must be finite (found NaN or inf)")
            extra[name] = arr
    if "fisher" in frame.columns:
        fisher = frame["fisher"].cast(pl.Float64).to_numpy()
        bad(~np.isfinite(fisher) | (fisher < 0), "fisher must be finite and >= 0")
        extra["fisher"] = fisher

    # every (seq, pos) exactly once in every layer
    dup = frame.select(pl.struct("seq", "pos", "layer").is_duplicated()).to_series()
    bad(dup, "(seq, pos, layer) appears more than once")
    counts = frame.group_by("seq", "pos").agg(pl.len().alias("n"))
    short = counts.filter(pl.col("n") != L)
    if short.height:
        s = short.sort("seq", "pos").row(0, named=True)
        have = frame.filter((pl.col("seq") == s["seq"]) & (pl.col("pos") == s["pos"]))["layer"].to_list()
        missing = sorted(set(range(L)) - set(have))
        raise UserError(f"{where}: token (seq={s['seq']}, pos={s['pos']}) is missing from layer(s) {missing[:8]}")

    order = frame.select(pl.arg_sort_by("seq", "pos", "layer")).to_series().to_numpy()
    T = frame.height // L
    tok = order.reshape(T, L)
    first = tok[:, 0]
    phase = frame["phase"].cast(pl.String).to_numpy()
    if np.any(phase[tok] != phase[first][:, None]):
        t = int(np.argmax((phase[tok] != phase[first][:, None]).any(1)))
        raise UserError(f"{where}: token (seq={frame['seq'][int(first[t])]}, pos={frame['pos'][int(first[t])]}) has different phases across layers")
    trace = Trace(
        model=model,
        seq=frame["seq"].to_numpy()[first].astype(np.int32),
        pos=frame["pos"].to_numpy()[first].astype(np.int32),
        is_decode=phase[first] == "decode",
        experts=experts[tok].astype(np.int16),
        weights=weights[tok].astype(np.float32),
        logits=extra["logits"][tok] if "logits" in extra else None,
        pregate={int(n.split("_")[1]): a[tok] for n, a in extra.items() if n.startswith("pregate_")},
        fisher=extra["fisher"][tok].astype(np.float32) if "fisher" in extra else None,
        token_id=frame["token_id"].to_numpy()[first].astype(np.int32) if "token_id" in frame.columns else None,
    )
    trace.check_shapes()
    return trace


def _dense_list(frame: pl.DataFrame, name: str, width: int, bad: Any, dtype: Any, where: str) -> np.ndarray:
    """A List column as a [rows, width] array; rows of another length are refused."""
    col = frame[name]
    if not isinstance(col.dtype, (pl.List, pl.Array)):
        raise UserError(f"{where}: column {name!r} must be a list, is {col.dtype}")
    inner = col.dtype.inner
    if not (inner.is_integer() if dtype == np.int64 else inner.is_numeric()):
        kind = "integers" if dtype == np.int64 else "numbers"
        raise UserError(f"{where}: column {name!r} must hold {kind}, holds {inner}")
    lens = col.list.len() if isinstance(col.dtype, pl.List) else pl.Series([col.dtype.size] * len(col))
    bad(lens != width, f"{name} must hold {width} values")
    if col.list.eval(pl.element().is_null().any()).list.first().any() if isinstance(col.dtype, pl.List) else False:
        bad(col.list.eval(pl.element().is_null().any()).list.first(), f"{name} holds a null value")
    try:
        values = col.explode().cast(pl.Float64 if dtype != np.int64 else pl.Int64).to_numpy()
    except pl.exceptions.InvalidOperationError as err:
        raise UserError(f"{where}: column {name!r} has values of the wrong type: {_first_line(err)}") from None
    return values.reshape(-1, width).astype(dtype)


def validate(trace: Trace) -> None:
    """Validate an in-memory trace the same way loading does (round-trip through the long form)."""
    from_frame(to_frame(trace), trace.model, where="trace")
