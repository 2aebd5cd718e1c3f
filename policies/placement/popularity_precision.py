"""`popularity_precision`: load a missed popular expert at full precision, a rare one as a low-bit copy (Fate).

Source: Fang et al., "Fate: Fast Edge Inference of Mixture-of-Experts Models via Cross-Layer Gate"
(arXiv 2502.12224, 2025), its popularity-aware hybrid quantisation: experts that are used often
are moved at higher precision, rarely used ones at lower precision, to cut I/O where it costs the
least accuracy.

Rule: the experts of each layer are ranked by usage (how many rows had them in their top-k; ties:
the lower expert id ranks higher). A missed expert among the first `ceil(hot_share * E)` of its
layer is loaded at the preset's precision (LOAD); any other is loaded as a `low_bits` copy (LOW:
into a staging buffer, run once, not cached). Usage counts come from
- `fit=online` (default): the trace's rows before the current token t (the replay's past; a
  serving run, whose order differs from the trace's, refuses it: `reads_replay_future`; give
  `fit=FIT_DIR` there);
- `fit=FIT_DIR`: a profile trace (`policies/fit.py` `fit_trace`, never the replayed one).
Either counts decode rows only when the trace has any (as `cache.name=static`), else every row.

A low-bit copy's bytes and dL are `low_precision_on_miss`'s: bytes = the preset's expert at
`low_bits` (group scales included); dL = 1/2 * S_l * w^2 * eps with eps = `rel_error`, or
4^-(low_bits - 1) when it is -1. The decision reads no gating weight, but the dL estimate does,
so `reads_weights` is True: a trace that records no weights (a vLLM log) is refused rather than
given a dL from the importer's 1/top_k.

Simplified relative to Fate: one low precision (Fate stores INT4 and INT2 variants and sends INT2
for the cold experts in prefill); the hot experts move at the preset's own precision; no
cross-layer prefetch or shallow-favouring cache (combine with those policies). Errors (`UserError`
naming the knob): `hot_share` outside [0, 1]; `low_bits` not below the preset's bits; a bad `fit`
or sensitivity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from policies.base import LOAD, LOW, Context
from policies.placement.low_precision_on_miss import LowCopyPlacement
from policies.registry import PLACEMENT
from sim.errors import UserError


def usage_counts(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """[L, E] int64: how many rows of `experts` ([T, L, k], -1 = none) have each expert in their top-k."""
    T, L, k = experts.shape
    ids = experts.astype(np.int64)
    layer = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
    ok = ids >= 0
    out = np.zeros((L, n_experts), np.int64)
    np.add.at(out, (layer[ok], ids[ok]), 1)
    return out


def is_hot(row: np.ndarray, e: int, n_hot: int) -> bool:
    """Whether expert `e` ranks among the first `n_hot` of its layer's usage `row` (more use
    first; ties: the lower id first)."""
    c = row[e]
    return int((row > c).sum() + (row[:e] == c).sum()) < n_hot


@PLACEMENT.register("popularity_precision")
class PopularityPrecision(LowCopyPlacement):
    reads_weights = True  # its dL estimate reads the gating weights
    @dataclass
    class Knobs:
        hot_share: float = 0.5  # the most used share of each layer's experts that loads at full precision
        fit: str = "online"  # usage counts: online (the trace's rows before t) | FIT_DIR (a profile trace)
        low_bits: float = 2.0  # bits of the low-precision copy of a cold expert
        rel_error: float = -1.0  # eps of a low-bit copy for dL; -1: 4^-(low_bits - 1)
        sensitivity: str = "trace"  # for dL: trace | published | FILE | none

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if not 0.0 <= knobs.hot_share <= 1.0:
            raise UserError(f"placement.hot_share must be in [0, 1] (a share of each layer's experts), "
                            f"got {knobs.hot_share}")
        self._low_copies(knobs, ctx)
        E = self.E = ctx.experts
        self.n_hot = min(E, math.ceil(knobs.hot_share * E - 1e-9))
        self.online = knobs.fit == "online"
        self.reads_replay_future = self.online  # rows before t are the run's past only in the replay
        if self.online:
            tr = ctx.trace
            self.rows = np.flatnonzero(tr.is_decode) if tr.is_decode.any() else np.arange(len(tr.is_decode))
            self.experts = tr.experts
            self.counts = np.zeros((ctx.layers, E), np.int64)
            self.absorbed = 0  # rows of self.rows counted so far (those before the highest t seen)
            self.hot = None
        else:
            from policies.gating.buddy import fit_rows

            counts = usage_counts(fit_rows(knobs.fit, ctx, "placement.fit"), E)
            self.hot = [is_hot(counts[key // E], key % E, self.n_hot) for key in range(ctx.layers * E)]

    def _absorb(self, t: int) -> None:
        """Count the rows before token t not counted yet."""
        stop = int(np.searchsorted(self.rows, t))  # rows < t
        if stop > self.absorbed:
            self.counts += usage_counts(self.experts[self.rows[self.absorbed:stop]], self.E)
            self.absorbed = stop

    def place(self, key: int, t: int, weight: float) -> str:
        if self.hot is not None:
            return LOAD if self.hot[key] else LOW
        self._absorb(t)
        return LOAD if is_hot(self.counts[key // self.E], key % self.E, self.n_hot) else LOW
