"""Routing statistics of a trace: pure numpy functions on a `Trace` (no plotting, no I/O but one).

What each number means (all on the tokens selected by `mask`, by default the decode tokens):

- `usage_entropy_bits`  [L]  entropy (bits) of how often each expert is selected in a layer,
  counting every top-k slot; uniform routing gives `log2(E)`.
- `reuse_rate`          [L]  mean |S_t & S_prev| / k, where S_t is token t's top-k set in that layer
  and S_prev the set of the previous selected token of the same sequence (by position; a token whose
  sequence has no earlier selected token does not count). Two independent uniform top-k draws give
  `k / E` (`uniform_reuse`).
- `pregate_accuracy`    {d: [L]}  indexed by the *target* layer l (the layer being predicted):
  share of the true top-k of layer l found in the top-k of `pregate_d` recorded at layer l - d;
  NaN for l < d. `top1` variants: whether pregate's first choice is in the true top-k (a one-expert
  prefetch is used) and whether it equals the true first expert.
- `adapmoe_kept`        [T, L]  experts AdapMoE's sensitivity gating runs (reference/adapmoe.md
  section 1): weights renormalised over the top-k, threshold `tau_l = sqrt(T / S_l)`; the lowest-
  weight experts are dropped while their summed weight stays `< tau_l` (at least one is kept). For
  top-2 this is exactly `w2 < sqrt(T / S_l)` -> one expert; for top-k > 2 it is the generalisation
  `S_l * dropped^2 < T` with the same constant as the top-2 rule.

Shape legend: T tokens, L layers, k top-k, E experts per layer, N selected tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sim.errors import UserError
from sim.trace.format import Trace

# ----------------------------------------------------------------------------------- selection


def token_mask(trace: Trace, phase: str = "decode") -> np.ndarray:
    """[T] bool: the tokens of `phase` (`decode`, `prefill` or `all`)."""
    if phase == "decode":
        return trace.is_decode.copy()
    if phase == "prefill":
        return ~trace.is_decode
    if phase == "all":
        return np.ones(trace.num_tokens, dtype=bool)
    raise UserError(f"unknown phase {phase!r}; known: decode, prefill, all")


def _mask(trace: Trace, mask: np.ndarray | None) -> np.ndarray:
    return token_mask(trace) if mask is None else np.asarray(mask, dtype=bool)


def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|set(a) & set(b)| along the last axis. a [..., k], b [..., m] of ids without repeats -> [...]."""
    return (a[..., :, None] == b[..., None, :]).sum(axis=(-1, -2))


# ------------------------------------------------------------------------------------ entropy


def expert_usage(trace: Trace, mask: np.ndarray | None = None) -> np.ndarray:
    """[L, E] int64: how many times each expert is selected (any rank) per layer."""
    L, E = trace.model.layers, trace.model.experts
    ids = trace.experts[_mask(trace, mask)].astype(np.int64)  # [N, L, k]
    flat = ids + (np.arange(L) * E)[None, :, None]  # layer-offset ids
    return np.bincount(flat.reshape(-1), minlength=L * E).reshape(L, E)


def usage_entropy_bits(trace: Trace, mask: np.ndarray | None = None) -> np.ndarray:
    """[L] entropy in bits of each layer's expert-usage distribution (NaN if no tokens)."""
    counts = expert_usage(trace, mask).astype(np.float64)
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = counts / total
        h = -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1)
    return np.where(total[:, 0] > 0, h, np.nan)


def uniform_entropy_bits(experts: int) -> float:
    return math.log2(experts)


# -------------------------------------------------------------------------------------- reuse


def previous_index(trace: Trace, mask: np.ndarray | None = None) -> np.ndarray:
    """[T] int64: index of the previous selected token of the same sequence (by pos), -1 if none.

    Unselected tokens get -1 too. Tokens are in (seq, pos) order in a loaded trace; this does not
    rely on it.
    """
    m = _mask(trace, mask)
    idx = np.flatnonzero(m)
    order = idx[np.lexsort((trace.pos[idx], trace.seq[idx]))]  # selected tokens by (seq, pos)
    prev = np.full(trace.num_tokens, -1, dtype=np.int64)
    same = trace.seq[order[1:]] == trace.seq[order[:-1]]
    prev[order[1:][same]] = order[:-1][same]
    return prev


def reuse_counts(trace: Trace, mask: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """([L] summed |S_t & S_prev| over pairs, number of pairs)."""
    prev = previous_index(trace, mask)
    cur = np.flatnonzero(prev >= 0)
    if cur.size == 0:
        return np.zeros(trace.model.layers), 0
    inter = overlap(trace.experts[cur], trace.experts[prev[cur]])  # [P, L]
    return inter.sum(axis=0).astype(np.float64), int(cur.size)


def reuse_rate(trace: Trace, mask: np.ndarray | None = None) -> np.ndarray:
    """[L] mean |S_t & S_prev| / k over consecutive selected tokens of a sequence (NaN if none)."""
    total, pairs = reuse_counts(trace, mask)
    if pairs == 0:
        return np.full(trace.model.layers, np.nan)
    return total / (pairs * trace.model.top_k)


def uniform_reuse(top_k: int, experts: int) -> float:
    """Expected |S & S'| / k for two independent uniform k-subsets of E experts: k / E."""
    return top_k / experts


# ---------------------------------------------------------------------------------- pre-gating


def pregate_accuracy(trace: Trace, mask: np.ndarray | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Per depth d: `topk`, `top1_in_topk`, `top1_exact`, each [L] by target layer (NaN for l < d).

    Empty when the trace has no `pregate_d` columns.
    """
    m = _mask(trace, mask)
    L, k = trace.model.layers, trace.model.top_k
    out: dict[int, dict[str, np.ndarray]] = {}
    for d in sorted(trace.pregate):
        res = {name: np.full(L, np.nan) for name in ("topk", "top1_in_topk", "top1_exact")}
        if d < L and m.any():
            logits = trace.pregate[d][m][:, : L - d]  # [N, L-d, E] predictions made at layers 0..L-d-1
            pred = np.argsort(-logits, axis=-1, kind="stable")[..., :k]  # [N, L-d, k]
            true = trace.experts[m][:, d:].astype(np.int64)  # [N, L-d, k] targets: layers d..L-1
            res["topk"][d:] = overlap(pred, true).mean(axis=0) / k
            res["top1_in_topk"][d:] = (pred[..., :1] == true).any(-1).mean(axis=0)
            res["top1_exact"][d:] = (pred[..., 0] == true[..., 0]).mean(axis=0)
        out[d] = res
    return out


# ------------------------------------------------------------------------------ AdapMoE gating


def adapmoe_kept(weights: np.ndarray, s_l: np.ndarray, T: float) -> np.ndarray:
    """[T, L] number of experts AdapMoE runs, from weights [T, L, k] and S_l [L] (module docstring)."""
    w = np.sort(np.asarray(weights, dtype=np.float64), axis=-1)  # ascending: lowest weight first
    with np.errstate(divide="ignore", invalid="ignore"):
        w = w / w.sum(axis=-1, keepdims=True)
        tau = np.sqrt(T / np.asarray(s_l, dtype=np.float64))  # [L]; S_l = 0 -> inf (drop freely)
    k = w.shape[-1]
    dropped = np.cumsum(w[..., : k - 1], axis=-1)  # [T, L, k-1] sum of the j+1 lowest weights
    n_drop = (dropped < tau[None, :, None]).sum(axis=-1)  # cumsum is monotone: a prefix
    return k - n_drop


def adapmoe_share(
    trace: Trace, s_l: np.ndarray, T: float, mask: np.ndarray | None = None
) -> dict[str, Any]:
    """AdapMoE gating at threshold T: per-layer and overall share of (token, layer) pairs on one
    expert, and the share of expert executions saved versus top-k."""
    m = _mask(trace, mask)
    k = trace.model.top_k
    kept = adapmoe_kept(trace.weights[m], s_l, T)  # [N, L]
    if kept.size == 0:
        nan = float("nan")
        return {"T": T, "single_share": nan, "executions_saved": nan,
                "single_share_by_layer": np.full(trace.model.layers, np.nan)}
    return {
        "T": float(T),
        "single_share": float((kept == 1).mean()),
        "executions_saved": float(1.0 - kept.mean() / k),
        "mean_experts": float(kept.mean()),
        "single_share_by_layer": (kept == 1).mean(axis=0),
    }


def read_sensitivity(path: Path | str, layers: int) -> np.ndarray:
    """S_l [layers] from a file: a YAML/JSON list, a mapping with `S_l` (or a trace's meta.yaml with
    `sensitivity: {S_l: [...]}`), or plain numbers separated by spaces, commas or newlines."""
    from sim.errors import read_text

    path = Path(path)
    if not path.is_file():
        raise UserError(f"sensitivity file not found: {path}")
    text = read_text(path, "sensitivity file")
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict):
        data = data.get("sensitivity", data)
        data = data.get("S_l") if isinstance(data, dict) else None
    if isinstance(data, str) or data is None or isinstance(data, (int, float)):
        data = text.replace(",", " ").split()
    try:
        arr = np.asarray([float(x) for x in data], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{path}: expected {layers} numbers (S_l per layer)") from None
    if arr.shape != (layers,) or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise UserError(f"{path}: expected {layers} finite numbers >= 0 (S_l per layer), got {arr.size}")
    return arr


# ------------------------------------------------------------------------------------ summary


def summarize(
    trace: Trace,
    *,
    T: Sequence[float] = (0.005,),
    s_l: np.ndarray | None = None,
    phase: str = "decode",
    segments: Sequence[int] | None = (),
    cache_experts: int | None = None,
    slots: Sequence[int] | None = (),
) -> dict[str, Any]:
    """Every statistic above as plain Python numbers and lists (JSON-ready; NaN -> None).

    With `segments` (segment lengths m; None: `sim.trace.locality.DEFAULT_SEGMENTS`) also
    `locality` (SRP and SCH, `sim.trace.locality`; SCH with `cache_experts` per layer); with `slots`
    (cache sizes; None: the default list) also `belady_ceiling`. Empty (the default here): the key
    is None. The `stats` command passes None for both, so it reports them by default."""
    m = token_mask(trace, phase)
    L, E, k = trace.model.layers, trace.model.experts, trace.model.top_k
    s_l = trace.sensitivity if s_l is None else np.asarray(s_l, dtype=np.float64)
    ent = usage_entropy_bits(trace, m)
    reuse_sum, pairs = reuse_counts(trace, m)
    out: dict[str, Any] = {
        "model": trace.model.name,
        "layers": L, "experts": E, "top_k": k, "phase": phase,
        "tokens": int(m.sum()), "sequences": int(np.unique(trace.seq[m]).size),
        "entropy_bits": {"by_layer": _list(ent), "mean": _num(np.nanmean(ent) if m.any() else np.nan),
                         "uniform": uniform_entropy_bits(E)},
        "reuse": {"by_layer": _list(reuse_rate(trace, m)), "pairs": pairs,
                  "mean": _num(reuse_sum.sum() / (pairs * L * k) if pairs else np.nan),
                  "uniform": uniform_reuse(k, E)},
        "pregate": {},
        "adapmoe": None,
    }
    for d, res in pregate_accuracy(trace, m).items():
        out["pregate"][str(d)] = {name: {"by_layer": _list(v), "mean": _num(_nanmean(v))}
                                  for name, v in res.items()}
    if s_l is not None:
        out["adapmoe"] = {"S_l": _list(s_l), "rule": "drop lowest weights while sum < sqrt(T / S_l)",
                          "thresholds": []}
        for t in T:
            r = adapmoe_share(trace, s_l, t, m)
            r["single_share_by_layer"] = _list(r["single_share_by_layer"])
            out["adapmoe"]["thresholds"].append({key: _num(v) if key != "single_share_by_layer" else v
                                                 for key, v in r.items()})
    out["locality"] = _locality_json(trace, m, segments, cache_experts)
    out["belady_ceiling"] = _ceiling_json(trace, slots)
    return out


def _locality_json(trace: Trace, m: np.ndarray, segments: Sequence[int] | None,
                   cache_experts: int | None) -> dict[str, Any] | None:
    """`locality`: {"segments": [m...], "cache_experts": c, "tail", "baseline", "segment_counts":
    {m: G}, "srp": {m: {"by_layer", "mean", "shuffled_by_layer", "shuffled_mean"}} (None without
    weights), "sch": the same}; None when `segments` is empty."""
    from sim.trace import locality as lc

    segments = lc.DEFAULT_SEGMENTS if segments is None else tuple(segments)
    if not segments:
        return None
    res = lc.locality(trace, m, segments, cache_experts)
    out: dict[str, Any] = {
        "segments": [int(x) for x in segments], "cache_experts": res["cache_experts"],
        "tail": "dropped", "baseline": f"routing shuffled within each layer (seed {lc.SHUFFLE_SEED})",
        "segment_counts": {}, "srp": {}, "sch": {},
    }
    for seg, r in res["by_m"].items():
        key = str(seg)
        out["segment_counts"][key] = r["segments"]
        for name in ("srp", "sch"):
            real, shuf = r[name], r[f"{name}_shuffled"]
            out[name][key] = None if real is None else {
                "by_layer": _list(real), "mean": _num(_nanmean(real)),
                "shuffled_by_layer": _list(shuf), "shuffled_mean": _num(_nanmean(shuf))}
    if all(v is None for v in out["srp"].values()):
        out["srp"] = None  # the trace records no usable weights
    return out


def _ceiling_json(trace: Trace, slots: Sequence[int] | None) -> dict[str, Any] | None:
    """`belady_ceiling`: {"slots": [C...], "scope", "prefill", "by_slots": {C: {"by_layer",
    "mean", "hits", "needed"}}}; `mean` is the decode hit rate over all layers (the run summary's
    `hit_rate`); None when `slots` is empty."""
    from sim.trace import locality as lc

    L, E, k = trace.model.layers, trace.model.experts, trace.model.top_k
    if slots is not None and len(slots) == 0:
        return None
    sizes = lc.ceiling_slots(None if slots is None else list(slots), L, E, k)
    if not sizes:
        return None
    res = lc.belady_ceiling(trace, sizes, prefill=True)
    by = {}
    for c, r in res.items():
        with np.errstate(divide="ignore", invalid="ignore"):
            layer_rate = np.where(r["needed"] > 0, r["hits"] / np.where(r["needed"] > 0, r["needed"], 1), np.nan)
        by[str(c)] = {"by_layer": _list(layer_rate), "mean": _num(r["hit_rate"]),
                      "hits": int(r["hits"].sum()), "needed": int(r["needed"].sum())}
    return {"slots": sizes, "scope": "global", "prefill": True, "policy": "baseline (top-k, no prefetch), MIN",
            "by_slots": by}


def _nanmean(v: np.ndarray) -> float:
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _list(a: np.ndarray) -> list[float | None]:
    return [_num(x) for x in np.asarray(a, dtype=np.float64)]
