"""Import external routing logs (expert ids + weights, no logits) as format-v1 traces.

One reader per format turns a file into `Records` (one entry per (seq, pos, layer), in file order,
each knowing where it came from for error messages); `build_trace` checks them against a model
preset and keeps the tokens present in every MoE layer. Accepted layouts (spec: traces/README.md):

- jsonl: one object per (sequence, layer, token): `{"problem_id": 0, "layer": 3, "token_idx": 7,
  "experts": [e1, e2], "gating_probs": [w1, w2]}`; field names from `ALIASES` or given explicitly.
- csv: one row per (seq, pos, layer) with a header; experts and weights either as columns
  `expert_0..expert_{k-1}` / `weight_0..weight_{k-1}` or as one column each holding a `;`-separated
  list (`3;5`).
- npz: arrays `experts [T, L, k]` and `weights [T, L, k]`, optional `seq [T]`, `pos [T]`,
  `phase [T]`; a (token, layer) whose ids are all -1 is missing.
- vllm: the routed experts vLLM returns with `enable_return_routed_experts` (ids only, no weights),
  as `.npy`, `.npz` or JSON Lines: `sim/trace/import_vllm.py`, docs/import.md.

A token absent from some layers is dropped, never shifted between layers; `strict=True` refuses.
Every problem is a `UserError` naming the line (or array index) and field.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.errors import UserError
from sim.machine.models import ModelPreset
from sim.trace.format import PHASES, ModelInfo, Trace

FORMATS = ("jsonl", "csv", "npz", "vllm")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".npz": "npz", ".npy": "vllm"}

#: role -> accepted field names, first match wins (checked on the first record / the header)
ALIASES: dict[str, tuple[str, ...]] = {
    "seq": ("seq", "problem_id", "request_id", "sequence", "seq_id", "sample_id"),
    "pos": ("pos", "token_idx", "position", "token_index", "token_pos"),
    "layer": ("layer", "layer_idx", "layer_id"),
    "experts": ("experts", "expert_ids", "topk_ids", "selected_experts"),
    "weights": ("weights", "gating_probs", "probs", "expert_weights", "topk_weights", "routing_weights"),
    "phase": ("phase", "stage"),
}
REQUIRED = ("pos", "layer", "experts", "weights")


@dataclass
class Records:
    """Routing records of a log, one per (seq, pos, layer), in file order (ragged lists allowed)."""

    seq: list[Any]  # ints or labels (strings)
    pos: list[int]
    layer: list[int]
    experts: list[Any]  # each a sequence of ids
    weights: list[Any]  # each a sequence of weights
    phase: list[str] | None  # 'prefill' | 'decode' per record; None: all decode
    where: Callable[[int], str]  # record index -> "routing.jsonl: line 12"
    fields: dict[str, str | None] = field(default_factory=dict)  # role -> the field name used
    source: dict[str, Any] = field(default_factory=dict)  # what the format adds to meta.yaml `source`


# ---------------------------------------------------------------------------------- readers


def read_jsonl(path: Path, names: dict[str, str]) -> Records:
    """JSON Lines: one object per (seq, pos, layer). Blank lines are skipped."""
    lines: list[int] = []
    rec = Records([], [], [], [], [], None, lambda i: f"{path}: line {lines[i]}")
    resolved: dict[str, str | None] | None = None
    with _open_text(path) as fh:
        for n, text in _numbered_lines(fh, path):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: line {n}: not valid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}: line {n}: expected a JSON object, got {type(obj).__name__}")
            if resolved is None:
                resolved = _resolve(names, set(obj), f"{path}: line {n}")
                rec.fields = resolved
                rec.phase = [] if resolved["phase"] else None
            where = f"{path}: line {n}"
            get = _getter(obj, where)
            lines.append(n)
            rec.seq.append(_label(get(resolved["seq"]), where, resolved["seq"]) if resolved["seq"] else 0)
            rec.pos.append(_int(get(resolved["pos"]), where, resolved["pos"]))
            rec.layer.append(_int(get(resolved["layer"]), where, resolved["layer"]))
            rec.experts.append(_int_list(get(resolved["experts"]), where, resolved["experts"]))
            rec.weights.append(_float_list(get(resolved["weights"]), where, resolved["weights"]))
            if rec.phase is not None:
                rec.phase.append(_phase(get(resolved["phase"]), where, resolved["phase"]))
    if resolved is None:
        raise UserError(f"{path}: the file holds no records")
    return rec


def read_csv(path: Path, names: dict[str, str]) -> Records:
    """CSV with a header row; one row per (seq, pos, layer) (see the module docstring)."""
    lines: list[int] = []
    rec = Records([], [], [], [], [], None, lambda i: f"{path}: line {lines[i]}")
    with _open_text(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise UserError(f"{path}: the file is empty (expected a header row)") from None
        except (csv.Error, UnicodeDecodeError) as err:
            raise UserError(f"{path}: line 1: not valid CSV text: {str(err)[:120]}") from None
        col = {h: i for i, h in enumerate(header)}
        # layout: k columns each (expert_0.., weight_0..) unless explicit names say otherwise
        split_cols = {r: _numbered(header, p) for r, p in (("experts", "expert_"), ("weights", "weight_"))}
        split = all(split_cols.values()) and not (names.get("experts") or names.get("weights"))
        have = set(header) | ({"experts", "weights"} if split else set())
        resolved = _resolve(names, have, f"{path}: line 1 (header)")
        rec.fields = dict(resolved)
        lists: dict[str, list[int] | None] = {"experts": None, "weights": None}  # None: one list column
        if split:
            for role, prefix in (("experts", "expert_"), ("weights", "weight_")):
                lists[role] = [col[c] for c in split_cols[role]]
                rec.fields[role] = f"{prefix}0..{prefix}{len(split_cols[role]) - 1}"
        rec.phase = [] if resolved["phase"] else None
        try:
            for row in reader:
                n = reader.line_num
                if not row or not any(c.strip() for c in row):
                    continue
                where = f"{path}: line {n}"
                if len(row) != len(header):
                    raise UserError(f"{where}: {len(row)} fields, the header has {len(header)}")

                def cell(name: str | None, row: list[str] = row, where: str = where) -> str:
                    v = row[col[name]].strip()  # type: ignore[index]
                    if v == "":
                        raise UserError(f"{where}: field {name!r} is empty")
                    return v

                def cells(role: str, row: list[str] = row, where: str = where) -> list[str]:
                    if lists[role] is None:
                        return _split_list(cell(resolved[role]), where, resolved[role])
                    out = [row[i].strip() for i in lists[role]]
                    if "" in out:
                        raise UserError(f"{where}: field {header[lists[role][out.index('')]]!r} is empty")
                    return out

                lines.append(n)
                rec.seq.append(_csv_label(cell(resolved["seq"])) if resolved["seq"] else 0)
                rec.pos.append(_int(cell(resolved["pos"]), where, resolved["pos"]))
                rec.layer.append(_int(cell(resolved["layer"]), where, resolved["layer"]))
                rec.experts.append(_int_list(cells("experts"), where, rec.fields["experts"]))
                rec.weights.append(_float_list(cells("weights"), where, rec.fields["weights"]))
                if rec.phase is not None:
                    rec.phase.append(_phase(cell(resolved["phase"]), where, resolved["phase"]))
        except csv.Error as err:
            raise UserError(f"{path}: line {reader.line_num}: not valid CSV: {err}") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: line {reader.line_num + 1}: not UTF-8 text (is this the right format?)") from None
    if not lines:
        raise UserError(f"{path}: the file holds no records")
    return rec


def read_npz(path: Path, names: dict[str, str]) -> Records:
    """NumPy .npz with `experts [T, L, k]`, `weights [T, L, k]`, optional `seq`, `pos`, `phase [T]`."""
    import zipfile

    if not zipfile.is_zipfile(path):  # np.load would try a pickle and talk about it
        raise UserError(f"{path} is not an .npz file (not a zip archive of arrays); is format= right? "
                        f"(known: {', '.join(FORMATS)})")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # damaged / not numpy / object arrays
        raise UserError(f"{path} is not a readable .npz file: {str(err).splitlines()[0][:200]}") from None
    res = _resolve(names, set(arrays), str(path), required=("experts", "weights"))
    ex, w = arrays[res["experts"]], arrays[res["weights"]]  # type: ignore[index]
    for name, a in ((res["experts"], ex), (res["weights"], w)):
        if a.ndim != 3:
            raise UserError(f"{path}: array {name!r} must be [tokens, layers, k], has shape {a.shape}")
    if ex.shape != w.shape:
        raise UserError(f"{path}: arrays {res['experts']!r} {ex.shape} and {res['weights']!r} {w.shape} differ in shape")
    if not np.issubdtype(ex.dtype, np.integer):
        raise UserError(f"{path}: array {res['experts']!r} must hold integers, holds {ex.dtype}")
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise UserError(f"{path}: array {res['weights']!r} must hold numbers, holds {w.dtype}")
    T, L, _ = ex.shape
    per_token = {}
    for role in ("seq", "pos", "phase"):
        if res[role]:
            a = arrays[res[role]]  # type: ignore[index]
            if a.shape != (T,):
                raise UserError(f"{path}: array {res[role]!r} must have shape ({T},), has {a.shape}")
            if role != "phase" and not np.issubdtype(a.dtype, np.integer):
                raise UserError(f"{path}: array {res[role]!r} must hold integers, holds {a.dtype}")
            per_token[role] = a
    seq = per_token.get("seq", np.zeros(T, dtype=np.int64)).astype(np.int64)
    if "pos" in per_token:
        pos = per_token["pos"].astype(np.int64)
    else:  # running index within each sequence, in array order
        pos = np.zeros(T, dtype=np.int64)
        seen: Counter[int] = Counter()
        for t, s in enumerate(seq.tolist()):
            pos[t], seen[s] = seen[s], seen[s] + 1
    missing = (ex == -1).all(axis=-1)  # [T, L]
    tt, ll = np.nonzero(~missing)  # row-major: token by token
    phase = None
    if "phase" in per_token:
        ph = per_token["phase"].astype(str)
        for t in np.flatnonzero(~np.isin(ph, PHASES))[:1]:
            raise UserError(f"{path}: {res['phase']}[{t}] = {ph[t]!r}; phase must be one of {PHASES}")
        phase = ph[tt].tolist()
    rec = Records(seq[tt].tolist(), pos[tt].tolist(), ll.tolist(), ex[tt, ll], w[tt, ll].astype(np.float64),
                  phase, lambda i: f"{path}: token {int(tt[i])}, layer {int(ll[i])}")
    rec.fields = {**res, "layer": "axis 1"}
    return rec


READERS: dict[str, Callable[[Path, dict[str, str]], Records]] = {
    "jsonl": read_jsonl, "csv": read_csv, "npz": read_npz,
}


# ---------------------------------------------------------------------------------- builder


@dataclass
class ImportReport:
    """What the import kept and dropped (also written to meta.yaml `source`)."""

    records: int
    tokens_seen: int
    tokens_kept: int
    tokens_dropped: int
    per_sequence: dict[Any, dict[str, int]]  # seq label -> {"kept": n, "dropped": n}
    dropped: list[tuple[Any, int]]  # (seq label, pos) of dropped tokens, in order

    def line(self, layers: int) -> str:
        """The one printed line."""
        msg = f"{self.records} records, {self.tokens_seen} tokens: kept {self.tokens_kept} tokens x {layers} layers"
        if not self.tokens_dropped:
            return msg + ", dropped 0"
        by_seq = [(s, c["dropped"]) for s, c in self.per_sequence.items() if c["dropped"]]
        shown = ", ".join(f"seq {s}: {n}" for s, n in by_seq[:8]) + (", ..." if len(by_seq) > 8 else "")
        eg = ", ".join(f"({s}, {p})" for s, p in self.dropped[:6]) + (", ..." if len(self.dropped) > 6 else "")
        return (f"{msg}, dropped {self.tokens_dropped} missing from some layers ({shown}; (seq, pos) = {eg})")


def build_trace(rec: Records, preset: ModelPreset, *, strict: bool = False) -> tuple[Trace, ImportReport]:
    """Check `rec` against the preset's shape; keep the tokens present in every layer."""
    L, E, k = preset.layers, preset.experts, preset.top_k
    N = len(rec.layer)
    where, f = rec.where, rec.fields
    n_ex = np.fromiter((len(e) for e in rec.experts), dtype=np.int64, count=N)
    n_w = np.fromiter((len(w) for w in rec.weights), dtype=np.int64, count=N)
    for i in np.flatnonzero(n_ex != n_w)[:1]:
        raise UserError(f"{where(i)}: {f['experts']!r} has {n_ex[i]} ids but {f['weights']!r} has {n_w[i]} values")
    if N and (n_ex == n_ex[0]).all() and n_ex[0] != k:
        raise UserError(f"the log routes top-{n_ex[0]} but model preset {preset.name!r} has top_k={k}; "
                        f"pick a model with the log's shape (model=, or model.top_k={n_ex[0]}: docs/models.md)")
    for i in np.flatnonzero(n_ex != k)[:1]:
        raise UserError(f"{where(i)}: {f['experts']!r} has {n_ex[i]} ids, expected {k} (top_k of {preset.name!r})")
    experts = np.asarray(rec.experts, dtype=np.int64).reshape(N, k)  # [N, k]
    weights = np.asarray(rec.weights, dtype=np.float64).reshape(N, k)  # [N, k]
    layer = np.asarray(rec.layer, dtype=np.int64)
    pos = np.asarray(rec.pos, dtype=np.int64)
    checks = [
        ((layer < 0) | (layer >= L), lambda i: f"{f['layer']!r} = {layer[i]} is out of range 0..{L - 1} "
                                               f"(model preset {preset.name!r} has {L} MoE layers)"),
        (pos < 0, lambda i: f"{f['pos']!r} = {pos[i]} is negative"),
        (((experts < 0) | (experts >= E)).any(1), lambda i: f"{f['experts']!r} = {experts[i].tolist()} has an id "
                                                            f"out of range 0..{E - 1} (model preset {preset.name!r})"),
        ((np.sort(experts, 1)[:, 1:] == np.sort(experts, 1)[:, :-1]).any(1),
         lambda i: f"{f['experts']!r} = {experts[i].tolist()} repeats an expert id"),
        (~np.isfinite(weights).all(1), lambda i: f"{f['weights']!r} = {weights[i].tolist()} is not finite"),
        ((weights < 0).any(1), lambda i: f"{f['weights']!r} = {weights[i].tolist()} has a negative weight"),
    ]
    for mask, msg in checks:
        for i in np.flatnonzero(mask)[:1]:
            raise UserError(f"{where(i)}: {msg(i)}")

    labels, seq = _factorize(rec.seq)
    # one key per token, one per (token, layer): find duplicates and incomplete tokens
    tok_keys, tok = np.unique(np.stack([seq, pos], 1), axis=0, return_inverse=True)  # tok [N]
    tok = tok.reshape(-1)
    cell = tok * L + layer
    order = np.argsort(cell, kind="stable")
    dup = np.flatnonzero(cell[order][1:] == cell[order][:-1])
    if dup.size:
        a, b = sorted((order[dup[0]], order[dup[0] + 1]))
        raise UserError(f"{where(b)}: (seq, pos, layer) = ({labels[seq[b]]}, {pos[b]}, {layer[b]}) "
                        f"repeats {where(a)}")
    is_decode = np.ones(N, dtype=bool) if rec.phase is None else np.asarray(rec.phase) == "decode"
    per_tok_phase = np.zeros(len(tok_keys), dtype=np.int64)
    np.add.at(per_tok_phase, tok, is_decode)
    layers_per_tok = np.bincount(tok, minlength=len(tok_keys))
    mixed = np.flatnonzero((per_tok_phase != 0) & (per_tok_phase != layers_per_tok))
    for t in mixed[:1]:
        i = int(np.flatnonzero(tok == t)[0])
        raise UserError(f"{where(i)}: token (seq={labels[seq[i]]}, pos={pos[i]}) has different phases across layers")
    complete = layers_per_tok == L  # [tokens seen]
    report = _report(N, tok_keys, complete, labels)
    if report.tokens_dropped and strict:
        s, p = report.dropped[0]
        t = int(np.flatnonzero(~complete)[0])
        missing = sorted(set(range(L)) - set(layer[tok == t].tolist()))
        raise UserError(f"{report.tokens_dropped} of {report.tokens_seen} tokens are missing from some layers "
                        f"(first: seq={s}, pos={p} lacks layer(s) {missing[:8]}); strict=true refuses to drop them")
    if not report.tokens_kept:
        have = sorted(set(layer.tolist()))
        raise UserError(f"no token is present in all {L} layers of model preset {preset.name!r} "
                        f"(the log has layers {have[0]}..{have[-1]}, {len(have)} distinct)")
    keep = complete[tok]
    idx = np.flatnonzero(keep)
    idx = idx[np.lexsort((layer[idx], tok[idx]))]  # by token (seq, pos), then layer
    T = idx.size // L
    first = idx.reshape(T, L)[:, 0]
    trace = Trace(
        model=model_info(preset, renormalize=bool(np.allclose(weights.sum(1), 1.0, atol=1e-3))),
        seq=seq[first].astype(np.int32),
        pos=pos[first].astype(np.int32),
        is_decode=is_decode[first],
        experts=experts[idx].reshape(T, L, k).astype(np.int16),
        weights=weights[idx].reshape(T, L, k).astype(np.float32),
    )
    return trace, report


def model_info(preset: ModelPreset, *, renormalize: bool, routing: str = "softmax_topk") -> ModelInfo:
    """The trace's `model` section from a preset (leading dense layers shift the MoE layer ids)."""
    return ModelInfo(
        name=preset.name, layers=preset.layers, experts=preset.experts, top_k=preset.top_k,
        hidden=preset.hidden, expert_width=preset.expert_width, shared_experts=preset.shared_experts,
        shared_expert_width=preset.shared_expert_width, dense_layers=preset.dense_layers,
        moe_layer_ids=tuple(range(preset.dense_layers, preset.dense_layers + preset.layers)),
        routing=routing, renormalize=renormalize,
    )


def import_log(path: Path, fmt: str, preset: ModelPreset, *, strict: bool = False,
               names: dict[str, str] | None = None) -> tuple[Trace, ImportReport]:
    """Read `path` in format `fmt` and build a trace for `preset`; fills `trace.source`."""
    if fmt not in FORMATS:
        raise UserError(f"unknown import format {fmt!r}; known: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"import file not found: {path}")
    if fmt == "vllm":  # its layer axis depends on the preset (dense layers): sim/trace/import_vllm.py
        from sim.trace.import_vllm import read_vllm

        rec = read_vllm(path, dict(names or {}), preset)
    else:
        rec = READERS[fmt](path, dict(names or {}))
    trace, report = build_trace(rec, preset, strict=strict)
    trace.source = {
        "tool": "python -m sim import",
        "file": path.name,
        "file_sha256": _sha256(path),
        "format": fmt,
        "fields": {r: v for r, v in rec.fields.items() if v},
        "strict": strict,
        "records": report.records,
        "tokens_seen": report.tokens_seen,
        "tokens_kept": report.tokens_kept,
        "tokens_dropped": report.tokens_dropped,
        "dropped_reason": "missing from some layers (never shifted between layers)",
        "per_sequence": {_yaml_key(s): c for s, c in report.per_sequence.items()},
        "dropped_tokens": [[_yaml_key(s), int(p)] for s, p in report.dropped[:1000]],
        "phase": "from the log" if rec.phase is not None else "all decode (the log has no phase field)",
        "weights_sum_to_one": trace.model.renormalize,
        # the whole model the log was imported for: `run` without model= replays it as this model
        # (sim/machine/model_source.py trace_model)
        "model_preset": dataclasses.asdict(preset),
    }
    trace.source.update(rec.source)
    labels = _factorize(rec.seq)[0]
    if any(code != label for code, label in labels.items()):
        trace.source["sequence_labels"] = {code: _yaml_key(label) for code, label in labels.items()}
    return trace, report


# ---------------------------------------------------------------------------------- helpers


def _report(n: int, tok_keys: np.ndarray, complete: np.ndarray, labels: dict[int, Any]) -> ImportReport:
    per: dict[Any, dict[str, int]] = {}
    for (s, _), ok in zip(tok_keys.tolist(), complete.tolist(), strict=True):
        c = per.setdefault(labels[s], {"kept": 0, "dropped": 0})
        c["kept" if ok else "dropped"] += 1
    dropped = [(labels[s], int(p)) for s, p in tok_keys[~complete].tolist()]
    return ImportReport(n, len(tok_keys), int(complete.sum()), int((~complete).sum()), per, dropped)


def _factorize(values: list[Any]) -> tuple[dict[int, Any], np.ndarray]:
    """Sequence labels -> ({code: label}, codes [N]). Ints in 0..2**31-1 are their own codes; other
    labels (strings, negative or huge ids) are numbered 0, 1, ... in order of first appearance."""
    if all(isinstance(v, int) for v in values):
        arr = np.asarray(values, dtype=np.int64)
        if arr.size and arr.min() >= 0 and arr.max() < 2**31:
            return {int(v): int(v) for v in np.unique(arr)}, arr
    codes_of: dict[Any, int] = {}
    codes = np.fromiter((codes_of.setdefault(v, len(codes_of)) for v in values), dtype=np.int64, count=len(values))
    return {c: v for v, c in codes_of.items()}, codes


def _yaml_key(v: Any) -> Any:
    return int(v) if isinstance(v, (int, np.integer)) else str(v)


def _resolve(names: dict[str, str], have: set[str], where: str,
             required: tuple[str, ...] = REQUIRED) -> dict[str, str | None]:
    """role -> field name: the explicit name if given, else the first alias present."""
    out: dict[str, str | None] = {}
    for role, aliases in ALIASES.items():
        explicit = names.get(role)
        if explicit:
            if explicit not in have:
                raise UserError(f"{where}: no field {explicit!r} (given as {role}_field); has {sorted(have)}")
            out[role] = explicit
            continue
        out[role] = next((a for a in aliases if a in have), None)
        if out[role] is None and role in required:
            raise UserError(f"{where}: missing field {role!r} (looked for {', '.join(aliases)}; "
                            f"name it with {role}_field=NAME)")
    return out


def _getter(obj: dict[str, Any], where: str) -> Callable[[str | None], Any]:
    def get(name: str | None) -> Any:
        if name not in obj:
            raise UserError(f"{where}: missing field {name!r}")
        if obj[name] is None:
            raise UserError(f"{where}: field {name!r} is null")
        return obj[name]
    return get


def _int(v: Any, where: str, name: str | None) -> int:
    if isinstance(v, str):
        try:
            v = int(v)
        except ValueError:
            raise UserError(f"{where}: field {name!r} must be an integer, got {v!r}") from None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{where}: field {name!r} must be an integer, got {v!r}")
    if not -(2**31) <= v < 2**31:  # ids, positions and layers are int32 in a trace
        raise UserError(f"{where}: field {name!r} = {v} is out of range (|value| < 2**31)")
    return v


def _label(v: Any, where: str, name: str | None) -> Any:
    """A sequence label: a string, or an integer (one beyond int64 is kept as its text)."""
    if isinstance(v, str):
        return v
    if isinstance(v, float) and v.is_integer() and abs(v) >= 2**63:
        return str(int(v))
    if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{where}: field {name!r} must be an integer or a string, got {v!r}")
    return v


def _csv_label(v: str) -> Any:
    try:
        n = int(v)
    except ValueError:
        return v
    return n if -(2**63) <= n < 2**63 else v


def _int_list(v: Any, where: str, name: str | None) -> list[int]:
    if not isinstance(v, (list, tuple)):
        raise UserError(f"{where}: field {name!r} must be a list of expert ids, got {v!r}")
    return [_int(x, where, name) for x in v]


def _float_list(v: Any, where: str, name: str | None) -> list[float]:
    if not isinstance(v, (list, tuple)):
        raise UserError(f"{where}: field {name!r} must be a list of weights, got {v!r}")
    out = []
    for x in v:
        if isinstance(x, str):
            try:
                x = float(x)
            except ValueError:
                raise UserError(f"{where}: field {name!r} must hold numbers, got {x!r}") from None
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise UserError(f"{where}: field {name!r} must hold numbers, got {x!r}")
        out.append(float(x))
    return out


def _phase(v: Any, where: str, name: str | None) -> str:
    if v not in PHASES:
        raise UserError(f"{where}: field {name!r} = {v!r}; phase must be one of {PHASES}")
    return str(v)


def _split_list(v: str, where: str, name: str | None) -> list[str]:
    """`3;5` (or `[3;5]`, or `3, 5` in a quoted field) -> ['3', '5']."""
    v = v.strip().removeprefix("[").removesuffix("]")
    parts = [p.strip() for p in v.replace(",", ";").split(";")]
    if "" in parts:
        raise UserError(f"{where}: field {name!r} = {v!r} is not a ';'-separated list")
    return parts


def _numbered_lines(fh: Any, path: Path) -> Any:
    """(line number, text) of a text file; undecodable bytes are a UserError naming the line."""
    n = 0
    while True:
        try:
            text = fh.readline()
        except UnicodeDecodeError:
            raise UserError(f"{path}: line {n + 1}: not UTF-8 text (is this the right format?)") from None
        if not text:
            return
        n += 1
        yield n, text


def _numbered(header: list[str], prefix: str) -> list[str]:
    """`expert_0, expert_1, ...` present in the header (consecutive from 0)."""
    out = []
    while f"{prefix}{len(out)}" in header:
        out.append(f"{prefix}{len(out)}")
    return out


def _open_text(path: Path, newline: str | None = None) -> Any:
    try:
        return open(path, encoding="utf-8", newline=newline)  # noqa: SIM115
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()

