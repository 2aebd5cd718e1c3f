"""`format=vllm`: the routed experts vLLM returns with `enable_return_routed_experts` (docs/import.md).

What vLLM gives (the sources are named in docs/import.md): per completion, `routed_experts`, a
numpy integer array `[rows, num_hidden_layers, top_k]` of expert ids (int32), one row per token
that went through a forward pass (the prompt's tokens, then the generated ones but the last),
in order; no router weights. vLLM's OpenAI-compatible server returns the same array as base64 of
its `.npy` bytes in `choices[i].routed_experts`.

The layouts read here, told apart by the file's first bytes:

- `.npy` (`np.save(f, out.outputs[0].routed_experts)`): one request, sequence 0;
- `.npz` (`np.savez(f, **{o.request_id: o.outputs[0].routed_experts for o in outputs})`): one
  array per request, named by its request id; `<name>.prompt_tokens` (an integer) optional;
- JSON Lines, one object per line: a request `{"request_id": "0", "prompt_tokens": 12,
  "routed_experts": R}` (R a nested list `[rows][layers][top_k]` or base64 of the `.npy` bytes;
  `request_id`, `prompt_tokens`, `prompt_start` optional), or a whole completions / chat response
  of the server (`response.model_dump()`: `choices[i].routed_experts`, `usage.prompt_tokens`).

Row `i` of a request is the token at position `prompt_start + i`; with the prompt's length `P`
known, positions `< P` are `prefill`, the others `decode` (else every row is `decode`). The layer
axis is either the preset's MoE layers or all decoder layers (`dense_layers + layers`: the dense
layers' rows hold no routing and are dropped). A (row, layer) whose ids are all -1 is missing.

vLLM records no weights: every weight is `1/top_k`, and meta.yaml `source.weights_recorded` is
false; `check_weights_recorded` refuses the policies that read the weights on such a trace.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sim.errors import UserError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK"
EXPERTS_FIELD = "routed_experts"
PROMPT_FIELDS = ("prompt_tokens", "num_prompt_tokens")
START_FIELDS = ("prompt_start", "routed_experts_prompt_start")
PROMPT_SUFFIX = ".prompt_tokens"

#: what meta.yaml `source.weights` says of an imported vLLM log
WEIGHTS_NOTE = "not recorded: vLLM returns expert ids only; every weight is 1/top_k"

#: presets whose dense decoder layers all come first (DeepSeek: `first_k_dense_replace`, MoE every
#: layer after), so a routes array over every decoder layer maps to the MoE ones by dropping its
#: first rows; for other models with dense layers (Qwen's `mlp_only_layers`, a sparse step) the
#: positions are not in the preset, and such a file is refused
LEADING_DENSE = frozenset({"deepseek-v2-lite", "deepseek-v3"})



@dataclass
class _Request:
    label: Any  # the sequence label (int or str)
    routes: np.ndarray  # [rows, layers in the file, k] int64
    prompt_tokens: int | None
    start: int  # position of row 0
    where: str  # "FILE: line 3" / "FILE: array 'x'"


# ---------------------------------------------------------------------------------- entry point


def read_vllm(path: Path, names: dict[str, str], preset: Any) -> Any:
    """`Records` (sim.trace.importer) of a vLLM routed-experts file, for model `preset`; their
    `source` holds what meta.yaml `source` adds for this format."""
    for role in ("pos", "layer", "weights", "phase"):
        if names.get(role):
            raise UserError(f"format=vllm takes no {role}_field= ({_NO_FIELD[role]})")
    head = _head(path)
    seq_field = None
    if head.startswith(NPY_MAGIC):
        _only_jsonl(names, "a .npy file")
        requests, layout = [_Request(0, _npy_array(_read_bytes(path), f"{path}: the array"), None, 0, str(path))], "npy"
    elif head.startswith(ZIP_MAGIC):
        _only_jsonl(names, "a .npz file")
        requests, layout = _read_npz(path), "npz"
    else:
        requests, layout, seq_field = _read_jsonl(path, names)
    rec, axis = _records(requests, preset, path)
    rec.fields = {"seq": seq_field, "experts": names.get("experts") or EXPERTS_FIELD, "layer": "axis 1"}
    n_prompt = sum(r.prompt_tokens is not None for r in requests)
    rec.source = {
        "layout": layout,
        "requests": len(requests),
        "layer_axis": axis,
        "weights": WEIGHTS_NOTE,
        "weights_recorded": False,
        "phase": (f"prefill below the prompt's length ({n_prompt} of {len(requests)} request(s) give it), "
                  "decode after" if n_prompt else "all decode (the file gives no prompt length)"),
    }
    return rec


_NO_FIELD = {"pos": "positions are the row order", "layer": "layers are the array's second axis",
             "weights": "vLLM records no weights", "phase": "the phase comes from prompt_tokens"}


def _only_jsonl(names: dict[str, str], what: str) -> None:
    for role in ("seq", "experts"):
        if names.get(role):
            raise UserError(f"{role}_field= names a JSON field, and {what} has none (format=vllm)")


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(8)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


# ------------------------------------------------------------------------------------- readers


def _npy_array(data: bytes, where: str) -> np.ndarray:
    """The integer array [rows, layers, k] of `.npy` bytes."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"{where} is not a readable .npy array: {str(err).splitlines()[0][:160]}") from None
    return _routes(arr, where)


def _routes(arr: np.ndarray, where: str, *, integral_floats: bool = False) -> np.ndarray:
    """One request's routed experts checked: integers (or, from JSON, whole floats), [rows, layers, k];
    an empty list is a request without rows. `where` names the array (`FILE: array 'x'`)."""
    if arr.size == 0 and arr.ndim <= 1:
        return np.zeros((0, 0, 0), dtype=np.int64)
    if arr.ndim != 3 or (arr.shape[0] and 0 in arr.shape[1:]):
        raise UserError(f"{where} must be [tokens, layers, top_k] expert ids, has shape {arr.shape}")
    if arr.dtype.kind == "f" and integral_floats:
        whole = np.isfinite(arr) & (arr == np.round(arr))
        if not whole.all():
            raise UserError(f"{where} must hold integer expert ids, holds {arr[~whole][0].item()!r}")
        if np.abs(arr).max() >= 2**31:
            raise UserError(f"{where} holds an expert id out of range ({np.abs(arr).max():g})")
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise UserError(f"{where} must hold integer expert ids, holds {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and arr.max() >= 2**31:
        raise UserError(f"{where} holds an expert id out of range ({arr.max()})")
    return arr.astype(np.int64)


def _read_npz(path: Path) -> list[_Request]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} is not a readable .npz file: {str(err).splitlines()[0][:200]}") from None
    prompts = {k[: -len(PROMPT_SUFFIX)]: v for k, v in arrays.items() if k.endswith(PROMPT_SUFFIX)}
    out = []
    for name, arr in arrays.items():
        if name.endswith(PROMPT_SUFFIX):
            continue
        where = f"{path}: array {name!r}"
        p = prompts.pop(name, None)
        prompt = None
        if p is not None:
            if p.size != 1 or p.dtype.kind not in "iu":
                raise UserError(f"{path}: array {name + PROMPT_SUFFIX!r} must be one integer (the prompt's length), "
                                f"has shape {p.shape} of {p.dtype}")
            prompt = _count(int(p.reshape(-1)[0]), f"{path}: array {name + PROMPT_SUFFIX!r}")
        out.append(_Request(_label(name), _routes(arr, where), prompt, 0, where))
    for name in prompts:
        raise UserError(f"{path}: array {name + PROMPT_SUFFIX!r} has no array {name!r} of routed experts")
    if not out:
        raise UserError(f"{path}: the archive holds no routed_experts array")
    return out


def _read_jsonl(path: Path, names: dict[str, str]) -> tuple[list[_Request], str, str | None]:
    from sim.trace.importer import ALIASES, _numbered_lines, _open_text

    experts_field = names.get("experts") or EXPERTS_FIELD
    out: list[_Request] = []
    kinds: set[str] = set()
    seq_field: str | None = None
    first = True
    with _open_text(path) as fh:
        for n, text in _numbered_lines(fh, path):
            if not text.strip():
                continue
            where = f"{path}: line {n}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON: {err.msg} (column {err.colno}); format=vllm reads "
                                "a .npy, a .npz or a JSON Lines file") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "choices" in obj and experts_field not in obj:
                kinds.add("responses")
                out += _response(obj, where, n)
                continue
            kinds.add("requests")
            if first:
                explicit = names.get("seq")
                if explicit and explicit not in obj:
                    raise UserError(f"{where}: no field {explicit!r} (given as seq_field); has {sorted(obj)}")
                seq_field = explicit or next((a for a in ALIASES["seq"] if a in obj), None)
                first = False
            if experts_field not in obj:
                raise UserError(f"{where}: missing field {experts_field!r} (a request's routed experts; name the "
                                "field with experts_field=NAME)")
            if seq_field is not None:
                if obj.get(seq_field) is None:
                    raise UserError(f"{where}: missing field {seq_field!r}")
                label = _json_label(obj[seq_field], where, seq_field)
            else:
                label = len(out)
            start = _first_of(obj, START_FIELDS, where)
            out.append(_Request(label, _decode(obj[experts_field], where, experts_field), _prompt(obj, where),
                                0 if start is None else start, where))
    if not out:
        raise UserError(f"{path}: the file holds no records")
    return out, "jsonl " + "+".join(sorted(kinds)), seq_field


def _response(obj: dict[str, Any], where: str, line: int) -> list[_Request]:
    """The sequences of one completions / chat response of vLLM's OpenAI-compatible server."""
    choices = obj["choices"]
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where}: field 'choices' must be a non-empty list")
    usage = obj.get("usage")
    prompt = None
    if isinstance(usage, dict) and usage.get("prompt_tokens") is not None:
        prompt = _count(usage["prompt_tokens"], f"{where}: usage.prompt_tokens")
    rid = obj.get("id")
    base = str(rid) if rid not in (None, "") else f"line {line}"
    out = []
    for j, choice in enumerate(choices):
        cw = f"{where}: choices[{j}]"
        if not isinstance(choice, dict) or choice.get(EXPERTS_FIELD) is None:
            raise UserError(f"{cw}: no routed_experts (was the server started with --enable-return-routed-experts?)")
        label = base if len(choices) == 1 else f"{base}/{choice.get('index', j)}"
        out.append(_Request(label, _decode(choice[EXPERTS_FIELD], cw, EXPERTS_FIELD), prompt, 0, cw))
    return out


def _leaves(value: Any) -> Any:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(reversed(v))
        else:
            yield v


def _decode(value: Any, where: str, name: str) -> np.ndarray:
    """A request's routed experts: a nested list, or base64 of `.npy` bytes (the server's encoding)."""
    if isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise UserError(f"{where}: field {name!r} is a string but not base64 (vLLM's server sends base64 of "
                            "the .npy bytes)") from None
        if not data.startswith(NPY_MAGIC):
            raise UserError(f"{where}: field {name!r} is base64 but not of a .npy array")
        return _npy_array(data, f"{where}: field {name!r} (decoded)")
    if not isinstance(value, list):
        raise UserError(f"{where}: field {name!r} must be a [tokens][layers][top_k] list of expert ids or base64 "
                        f"of a .npy array, got {type(value).__name__}")
    for x in _leaves(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise UserError(f"{where}: field {name!r} must hold integer expert ids, holds {x!r}")
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError):
        arr = None
    if arr is None or arr.dtype == object:
        raise UserError(f"{where}: field {name!r} is not a [tokens][layers][top_k] list (its rows differ in "
                        "length, or an id is too large)")
    return _routes(arr, f"{where}: field {name!r}", integral_floats=True)


# ------------------------------------------------------------------------------------ helpers


def _count(v: Any, where: str) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 2**31:
        raise UserError(f"{where} must be a whole number >= 0, got {v!r}")
    return v


def _first_of(obj: dict[str, Any], fields: tuple[str, ...], where: str) -> int | None:
    for f in fields:
        if obj.get(f) is not None:
            return _count(obj[f], f"{where}: field {f!r}")
    return None


def _prompt(obj: dict[str, Any], where: str) -> int | None:
    n = _first_of(obj, PROMPT_FIELDS, where)
    if n is None and isinstance(obj.get("prompt_token_ids"), list):
        n = len(obj["prompt_token_ids"])
    return n


def _label(name: str) -> Any:
    from sim.trace.importer import _csv_label

    return _csv_label(name)


def _json_label(v: Any, where: str, name: str) -> Any:
    from sim.trace.importer import _label as label

    if isinstance(v, str):
        return _label(v)  # vLLM's request ids are strings: "0", "1", ... are kept as numbers
    return label(v, where, name)


def _records(requests: list[_Request], preset: Any, path: Path) -> tuple[Any, str]:
    """One record per (request, row, layer) present, token by token; layers mapped to MoE layers."""
    from sim.trace.importer import Records

    L, dense = preset.layers, preset.dense_layers
    seq: list[Any] = []
    pos_parts, layer_parts, ex_parts, req_parts, row_parts = [], [], [], [], []
    phase: list[str] | None = [] if any(r.prompt_tokens is not None for r in requests) else None
    axis = ""
    offsets = []
    for i, r in enumerate(requests):
        rows, layers, k = r.routes.shape
        offset = 0
        if rows and layers == L:
            axis = axis or f"{L} MoE layers"
        elif rows and dense and layers == dense + L:
            if preset.name not in LEADING_DENSE:  # where its dense layers sit is not known here
                raise UserError(f"{r.where}: routed_experts counts all {layers} decoder layers, but where the "
                                f"{dense} dense layer(s) of model {preset.name!r} sit is not known here (only "
                                f"{', '.join(sorted(LEADING_DENSE))} are known to lead with them); keep only the "
                                "MoE layers' routes in the file")
            offset = dense
            axis = axis or f"{dense + L} decoder layers; the first {dense} (dense) dropped"
        elif rows:
            also = f" (or {dense + L} counting its {dense} dense layer(s))" if dense else ""
            raise UserError(f"{r.where}: routed_experts has {layers} layers; model preset {preset.name!r} has {L} MoE "
                            f"layers{also}: pick the preset of the model that was served")
        offsets.append(offset)
        if not rows:
            continue
        if ex_parts and k != ex_parts[0].shape[1]:
            raise UserError(f"{r.where}: routed_experts has top-{k}, an earlier request top-{ex_parts[0].shape[1]}")
        routes = r.routes[:, offset:, :]  # [rows, L, k]
        tt, ll = np.nonzero(~(routes == -1).all(axis=-1))  # the present (row, layer), token by token
        pos = r.start + tt
        seq += [r.label] * tt.size
        pos_parts.append(pos)
        layer_parts.append(ll)
        ex_parts.append(routes[tt, ll])
        req_parts.append(np.full(tt.size, i))
        row_parts.append(tt)
        if phase is not None:
            prompt = r.prompt_tokens if r.prompt_tokens is not None else 0
            phase += np.where(pos < prompt, "prefill", "decode").tolist()
    if not seq:
        raise UserError(f"{path}: the file holds no routed experts (every request has 0 tokens)")
    experts = np.concatenate(ex_parts)  # [N, k]
    req, row, layer = np.concatenate(req_parts), np.concatenate(row_parts), np.concatenate(layer_parts)

    def where(j: int) -> str:
        i = int(req[j])
        return f"{requests[i].where}, row {int(row[j])}, layer {int(layer[j]) + offsets[i]}"

    k = experts.shape[1]
    rec = Records(seq, np.concatenate(pos_parts).tolist(), layer.tolist(), experts,
                  np.full(experts.shape, 1.0 / k), phase, where)
    return rec, axis


# ------------------------------------------------------------------------- refusing the weights


def check_weights_recorded(trace: Any, sections: dict[str, Any]) -> None:
    """Refuse (UserError) a policy that reads the gating weights on a trace that has none
    (`source.weights_recorded: false`, a vLLM import). `sections`: `{"gating": {"name": ...}, ...}`
    (a RunConfig's policy sections)."""
    if trace.source.get("weights_recorded", True) is not False:
        return
    from policies.registry import GATING, PLACEMENT

    for fam, registry in (("gating", GATING), ("placement", PLACEMENT)):
        name = (sections.get(fam) or {}).get("name")
        if name is not None and getattr(registry.get(str(name)), "reads_weights", False):  # plug-ins too
            raise UserError(f"{fam} policy {name!r} reads the gating weights, which this trace does not record "
                            f"({trace.source.get('weights', 'source.weights_recorded: false')}); use a policy that "
                            "needs only the expert ids (gating topk) or a log with weights (format=jsonl|csv|npz)")
