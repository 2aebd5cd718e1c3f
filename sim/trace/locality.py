"""Local routing consistency of a trace (SRP, SCH) and the Belady hit ceiling per cache size.

SRP and SCH follow arXiv 2505.16056 ("Not All Models Suit Expert Offloading: On Local Routing
Consistency of MoE Models", 2025). The paper's exact formulas could not be fetched; this is our
reading of its two names, defined here exactly:

- A *segment* of length m: m consecutive selected tokens (by default the decode tokens) of one
  sequence, ordered by position; each sequence is cut into non-overlapping windows from its first
  selected token on, and a shorter tail (fewer than m tokens) is *dropped*. A sequence with fewer
  than m selected tokens gives no segment.
- SRP(m), Segment Routing best Performance, of layer l: the mean over segments of
  `max over S, |S| = top_k, of (sum over the segment's tokens t of sum_{e in S} w_t,e) / m`, where
  `w_t,e` is the weight token t gives expert e at layer l: the trace's top-k weights,
  renormalised over the top-k (so each token's weights sum to 1; 0 for an expert outside its
  top-k). It is how much of the routing one fixed set of top_k experts could serve for m tokens.
- SCH(m, c), Segment Cache best Hit rate, of layer l: the mean over segments of
  `max over S, |S| = c, of (number of the segment's (token, expert) activations with expert in S)
  / (m * top_k)`: the hit rate of the best cache of c experts of that layer held fixed for the
  segment (the segment's own first uses count as hits: the cache is chosen knowing the segment).
- Both maxima are the sums of the largest scores: the objective is `sum_{e in S} a_e` with a
  score `a_e >= 0` per expert (summed weight, or activation count), and replacing a member of S
  by a larger-scoring non-member never lowers the sum, so the top-|S| scores attain the maximum.
- The means over layers are unweighted (every layer has the same segments).
- Random-routing baseline (`shuffled`): the same numbers after a seeded shuffle (seed 0) of the
  selected tokens' routing within each layer, pooled over sequences, with the segments kept where
  they were: each layer keeps its expert popularity and each token its (ids, weights) pair, but
  the order, the only source of locality beyond popularity, is gone. For m = 1 it equals the real
  value (SRP(1) = 1, SCH(1, c >= top_k) = 1).

The Belady ceiling (`belady_ceiling`) is the exact optimum (MIN, `policies.cache.belady`, the
loads of `sim.offline.schedule.min_loads`) of the demand-hit rate of a global cache of C slots in
the engine's step semantics, as `python -m sim run policy=baseline cache.name=belady
cache.scope=global cache.slots=C` reports it in `hit_rate`: top-k gating, no prefetch, prefill as
the simulator does it by default (`engine.prefill=true`: each prompt one batch per layer, the
union of its tokens' experts, its loads fill the cache), hits counted over the decode steps
only (hits / needed, needed = top_k per decode (token, layer)); C above layers * experts is
clipped as the simulator clips it, and C < top_k is refused as the simulator refuses it.

Shape legend: T tokens, L layers, k top-k, E experts per layer, N selected tokens, G segments,
m tokens per segment.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence
from typing import Any

import numpy as np

from sim.errors import UserError
from sim.trace.format import Trace

DEFAULT_SEGMENTS = (1, 4, 16, 64)
DEFAULT_SLOTS = (16, 32, 64, 128, 256)
SHUFFLE_SEED = 0
_CHUNK_CELLS = 1 << 22  # scores computed for at most this many (segment, layer, expert) cells at once

# ------------------------------------------------------------------------------------ segments


def ordered_selected(trace: Trace, mask: np.ndarray) -> np.ndarray:
    """[N] int64: the selected tokens' indices in (seq, pos) order."""
    idx = np.flatnonzero(np.asarray(mask, dtype=bool))
    return idx[np.lexsort((trace.pos[idx], trace.seq[idx]))]


def segment_rows(seq: np.ndarray, m: int) -> np.ndarray:
    """[G, m] int64: rows of `seq` [N] (sequence ids, grouped, in order) forming full windows of m
    consecutive rows of one sequence, from each sequence's first row; a shorter tail is dropped."""
    n = seq.size
    if n == 0:
        return np.zeros((0, m), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])  # [S] first row of each sequence
    lengths = np.diff(np.r_[starts, n])  # [S]
    first = np.repeat(starts, lengths)  # [N] the first row of each row's sequence
    rank = np.arange(n) - first  # [N] row's index within its sequence
    end = np.repeat(starts + lengths, lengths)  # [N] one past the sequence's last row
    heads = np.flatnonzero((rank % m == 0) & (np.arange(n) + m <= end))  # [G] window starts
    return heads[:, None] + np.arange(m)[None, :]  # [G, m]


def top_scores(ids: np.ndarray, values: np.ndarray, experts: int, size: int) -> np.ndarray:
    """[G, L] sum of the `size` largest per-expert scores of each segment and layer, where an
    expert's score is the sum of `values` over the segment's slots that route to it.
    ids, values [G, m, L, k]."""
    G, m, L, k = ids.shape
    out = np.zeros((G, L), dtype=np.float64)
    step = max(1, _CHUNK_CELLS // max(1, L * experts))
    size = min(size, experts)
    for g0 in range(0, G, step):
        g1 = min(G, g0 + step)
        cell = (np.arange(g1 - g0)[:, None, None, None] * L + np.arange(L)[None, None, :, None]) * experts
        flat = (cell + ids[g0:g1].astype(np.int64)).reshape(-1)  # [(g m L k)] (segment, layer, expert) cell
        scores = np.bincount(flat, weights=values[g0:g1].reshape(-1), minlength=(g1 - g0) * L * experts)
        scores = np.sort(scores.reshape(g1 - g0, L, experts), axis=-1)  # [g, L, E] ascending
        out[g0:g1] = scores[..., experts - size:].sum(axis=-1)
    return out


def renormalised_weights(weights: np.ndarray) -> np.ndarray:
    """[..., k] float64: weights divided by their sum over the top-k (NaN where that sum is 0)."""
    w = np.asarray(weights, dtype=np.float64)
    s = w.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s > 0, w / np.where(s > 0, s, 1.0), np.nan)


def weights_usable(trace: Trace, mask: np.ndarray) -> bool:
    """Whether the selected tokens' weights define SRP: recorded, and every top-k sum positive."""
    if trace.source.get("weights_recorded", True) is False:
        return False
    return bool(np.all(trace.weights[np.asarray(mask, dtype=bool)].sum(axis=-1) > 0))


def shuffle_within_layers(ids: np.ndarray, weights: np.ndarray, seed: int = SHUFFLE_SEED):
    """(ids, weights) [N, L, k] with the N rows permuted independently in each layer (seeded)."""
    N, L = ids.shape[:2]
    perm = np.argsort(np.random.default_rng(seed).random((N, L)), axis=0)  # [N, L] a permutation per layer
    return (np.take_along_axis(ids, perm[:, :, None], axis=0),
            np.take_along_axis(weights, perm[:, :, None], axis=0))


def segment_best(ids: np.ndarray, weights: np.ndarray | None, seq: np.ndarray, m: int, c: int,
                 experts: int) -> dict[str, Any]:
    """SRP(m) and SCH(m, c) per layer (module docstring) of selected rows in (seq, pos) order.

    ids [N, L, k], weights [N, L, k] renormalised (None: SRP not defined), seq [N]. Returns
    `segments` G and `srp`, `sch` [L] (NaN when G = 0; `srp` None without weights)."""
    rows = segment_rows(seq, m)  # [G, m]
    L, k = ids.shape[1], ids.shape[2]
    G = rows.shape[0]
    if G == 0:
        nan = np.full(L, np.nan)
        return {"segments": 0, "srp": None if weights is None else nan, "sch": nan}
    seg_ids = ids[rows]  # [G, m, L, k]
    hits = top_scores(seg_ids, np.ones(seg_ids.shape), experts, c) / (m * k)  # [G, L]
    srp = None
    if weights is not None:
        srp = (top_scores(seg_ids, weights[rows], experts, k) / m).mean(axis=0)  # [L]
    return {"segments": int(G), "srp": srp, "sch": hits.mean(axis=0)}


def locality(trace: Trace, mask: np.ndarray, segments: Sequence[int] = DEFAULT_SEGMENTS,
             cache_experts: int | None = None) -> dict[str, Any]:
    """SRP and SCH for every m in `segments`, real and shuffled, as numpy arrays per m.

    `cache_experts` c: SCH's cache size per layer (default min(2 * top_k, E))."""
    E, k = trace.model.experts, trace.model.top_k
    c = check_locality_args(segments, cache_experts, E, k)
    order = ordered_selected(trace, mask)  # [N]
    ids = trace.experts[order].astype(np.int64)  # [N, L, k]
    w = renormalised_weights(trace.weights[order]) if weights_usable(trace, mask) else None  # [N, L, k]
    seq = trace.seq[order]  # [N]
    sh_ids, sh_w = shuffle_within_layers(ids, ids if w is None else w)
    sh_w = None if w is None else sh_w
    out: dict[str, Any] = {"cache_experts": c, "by_m": {}}
    for m in segments:
        real = segment_best(ids, w, seq, m, c, E)
        shuf = segment_best(sh_ids, sh_w, seq, m, c, E)
        out["by_m"][m] = {"segments": real["segments"], "srp": real["srp"], "sch": real["sch"],
                          "srp_shuffled": shuf["srp"], "sch_shuffled": shuf["sch"]}
    return out


def check_locality_args(segments: Sequence[int], cache_experts: int | None, experts: int, top_k: int) -> int:
    """Refuse a segment length < 1 or a cache size outside 1..E; return c (default min(2k, E))."""
    from sim.validate import COUNT, check_number

    for i, m in enumerate(segments):
        check_number(m, f"segment[{i}]", COUNT)
    if cache_experts is None:
        return min(2 * top_k, experts)
    c = check_number(cache_experts, "cache_experts", COUNT)
    if c > experts:
        raise UserError(f"bad value for 'cache_experts': {c} (a layer has {experts} experts; must be 1..{experts})")
    return int(c)


# ------------------------------------------------------------------------------ Belady ceiling


def ceiling_slots(slots: Sequence[int] | None, layers: int, experts: int, top_k: int) -> list[int]:
    """The cache sizes to bound: `slots` (default `DEFAULT_SLOTS`) clipped to layers * experts,
    deduplicated, increasing. A size < 1, or < top_k (the simulator refuses it), is a UserError."""
    from sim.validate import COUNT, check_number

    total = layers * experts
    if slots is None:
        return sorted({min(c, total) for c in DEFAULT_SLOTS if min(c, total) >= top_k})
    out = set()
    for i, c in enumerate(slots):
        c = check_number(c, f"slots[{i}]", COUNT)
        if c < top_k:
            raise UserError(f"bad value for 'slots[{i}]': {c} (one layer needs top_k = {top_k} slots; "
                            f"the simulator refuses a smaller cache)")
        out.add(min(int(c), total))
    return sorted(out)


def _context(trace: Trace, slots: int, prefill: bool):
    """A policy `Context` for an offline MIN replay: top-k gating, every expert 1 byte, C slots."""
    from policies.base import Context
    from sim.engine.cache import ExpertCache

    L, E = trace.model.layers, trace.model.experts
    unit = types.SimpleNamespace(expert_bytes=1.0)  # min_loads reads only the size of one expert
    return Context(trace=trace, preset=unit, cache=ExpertCache(L, E, float(slots)), capacity_slots=slots,
                   rng=np.random.default_rng(0), prefill=prefill, max_tokens=0)


def belady_ceiling(trace: Trace, slots: Sequence[int], *, prefill: bool = True) -> dict[int, dict[str, Any]]:
    """Per cache size C: MIN's decode `hits`, `needed` (both [L]) and `hit_rate` (hits / needed
    summed over layers), for a global cache of C slots (module docstring)."""
    from sim.offline.schedule import min_loads

    L, E = trace.model.layers, trace.model.experts
    if not slots:
        return {}
    base = _context(trace, slots[0], prefill)
    steps = base.steps()  # built once, shared by every size
    decode = ~np.asarray(steps.is_prefill, dtype=bool)  # [S] steps
    step_layer = np.asarray(steps.layer, dtype=np.int64)  # [S]
    n_keys = np.fromiter((len(ks) for ks in steps.keys), dtype=np.int64, count=steps.n)  # [S]
    needed = np.bincount(step_layer[decode], weights=n_keys[decode], minlength=L)  # [L]
    out: dict[int, dict[str, Any]] = {}
    for c in slots:
        ctx = dataclasses.replace(base, cache=type(base.cache)(L, E, float(c)), capacity_slots=c)
        loads = min_loads(ctx, scope="global")
        load_step = np.fromiter((ld.step for ld in loads), dtype=np.int64, count=len(loads))  # [loads]
        load_step = load_step[decode[load_step]]  # the demand loads of decode steps: the misses
        misses = np.bincount(step_layer[load_step], minlength=L).astype(np.float64)  # [L]
        hits = needed - misses
        total = needed.sum()
        out[c] = {"hits": hits, "needed": needed, "hit_rate": hits.sum() / total if total else np.nan}
    return out
