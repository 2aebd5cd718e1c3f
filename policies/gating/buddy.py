"""`buddy`: run a resident "buddy" in place of a missed low-weight expert (BuddyMoE, 2025).

Source: Wang et al., "BuddyMoE: Exploiting Expert Redundancy to Accelerate Memory-Constrained
Mixture-of-Experts Inference" (arXiv 2511.10054, 2025). On a prefetch miss, BuddyMoE runs a cached
expert of similar function (its buddy, found from co-activation statistics) instead of loading the
missed one.

Rule, per (token t, layer l): an expert of the model's top-k other than the top-1 that is neither
resident nor loading and whose renormalised weight is below `w_max` is replaced by its buddy: the
resident expert of layer l (not already active in this step) that was most often co-activated with
it, i.e. in the same top-k row of layer l; the buddy keeps the missed expert's weight. An expert
never co-activated with it (count 0) is no buddy. Without a resident buddy the missed expert is
kept (loaded, as the placement decides), or dropped with `drop_without_buddy=true` (the rest are
renormalised). Co-activation counts come from
- `fit=online` (default): the rows of the replay gated so far (their traced top-k), each row
  counted once, after its own decision (the run's past only);
- `fit=FIT_DIR`: a profile trace (`policies/fit.py` `fit_trace`, never the replayed one), its
  decode rows (every row when it has none).
Ties between equally co-activated buddies: the lower expert id.

dL estimate, as `substitute`'s: 1/2 * S_l * sum of w^2 over the replaced (or dropped) experts: a
buddy counts as no better than dropping the expert (conservative). `sensitivity`: trace |
published | FILE | none, as `substitute`.

Simplified relative to BuddyMoE: its three-metric runtime test (token activating entropy, the
gate score, a buddy-similarity threshold) is reduced to the gate-weight threshold `w_max`; buddies
are ranked by co-activation counts only (no output-similarity profiling); there is no buddy-aware
prefetch or cache. Stateful (reads the cache): it decides per (token, layer); its bound plan is
the top-1 and every expert of weight >= `w_max`, which it runs whatever the cache holds.
Errors: a bad `fit` (see `fit_trace`) or sensitivity is a `UserError` naming the knob.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, GatingPlan, GatingPolicy
from policies.gating.drop_on_miss import kept_whatever_the_cache
from policies.published import sensitivities_or_none
from policies.registry import GATING
from sim.engine.cache import RESIDENT


def coactivation_counts(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """[L, E, E] int64: how many rows of `experts` ([T, L, k], -1 = none) have both a and b in
    their top-k at layer l (a != b; symmetric; the diagonal is 0)."""
    T, L, k = experts.shape
    out = np.zeros((L, n_experts, n_experts), np.int64)
    ids = experts.astype(np.int64)
    layer = np.broadcast_to(np.arange(L)[None, :], (T, L))
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            a, b = ids[:, :, i], ids[:, :, j]
            ok = (a >= 0) & (b >= 0) & (a != b)
            np.add.at(out, (layer[ok], a[ok], b[ok]), 1)
    return out


@GATING.register("buddy")
class Buddy(GatingPolicy):
    reads_weights = True  # decides by the gating weights

    @dataclass
    class Knobs:
        w_max: float = 0.2  # replace a missed non-top-1 expert whose renormalised weight is below this
        fit: str = "online"  # co-activation counts: online (the run's past rows) | FIT_DIR (a profile trace)
        drop_without_buddy: bool = False  # no resident buddy: drop the missed expert instead of loading it
        sensitivity: str = "trace"  # for dL: trace | published | FILE | none

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        self.S = sensitivities_or_none(knobs.sensitivity, ctx)
        tr = ctx.trace
        self.ids = tr.experts.tolist()
        self.w = tr.weights.tolist()
        E = ctx.experts
        self.online = knobs.fit == "online"
        if self.online:
            self.count = [[[0] * E for _ in range(E)] for _ in range(ctx.layers)]  # [l][a][b]
            self.counted = [bytearray(ctx.layers) for _ in range(tr.experts.shape[0])]  # row (t, l) counted
            self.order = None
        else:
            fit = fit_rows(knobs.fit, ctx, "gating.fit")
            counts = coactivation_counts(fit, E)
            # per (l, e): candidate buddies, most co-activated first (ties: lower id), count > 0 only
            self.order = [[[int(c) for c in np.lexsort((np.arange(E), -counts[layer, e])) if counts[layer, e, c] > 0]
                           for e in range(E)] for layer in range(ctx.layers)]

    def bound_plan(self) -> GatingPlan:
        """The experts it runs whatever the cache holds: it replaces (or drops) only a missed
        non-top-1 expert below `w_max`; its buddy, a resident, is not counted."""
        return kept_whatever_the_cache(self.ctx.trace, self.knobs.w_max)

    def _buddy(self, layer: int, e: int, taken: list[int], state: list[int], base: int) -> int | None:
        """The resident buddy of missed expert `e` at `layer` not in `taken`, or None."""
        if self.order is not None:
            return next((c for c in self.order[layer][e] if c not in taken and state[base + c] == RESIDENT), None)
        row = self.count[layer][e]
        best, best_n = None, 0
        for c, n in enumerate(row):  # ascending id: a tie keeps the lower id
            if n > best_n and state[base + c] == RESIDENT and c not in taken:
                best, best_n = c, n
        return best

    def decide(self, t: int, layer: int) -> tuple[list[int], list[float], float]:
        ids, w = self.ids[t][layer], self.w[t][layer]
        total = sum(w)
        cache = self.ctx.cache
        state = cache.state
        base = layer * self.ctx.experts
        w_max = self.knobs.w_max
        out_i, out_w, lost = [], [], 0.0
        for j, (e, x) in enumerate(zip(ids, w, strict=True)):
            x /= total
            if e < 0:
                continue
            if j == 0 or x >= w_max or cache.is_present(base + e):
                out_i.append(e)
                out_w.append(x)
                continue
            sub = self._buddy(layer, e, ids + out_i, state, base)
            if sub is not None:
                out_i.append(sub)
                out_w.append(x)
                lost += x * x
            elif self.knobs.drop_without_buddy:
                lost += x * x
            else:
                out_i.append(e)
                out_w.append(x)
        if self.online and not self.counted[t][layer]:  # this row joins the past of later decisions
            self.counted[t][layer] = 1
            row = self.count[layer]
            for a in ids:
                for b in ids:
                    if a != b and a >= 0 and b >= 0:
                        row[a][b] += 1
        s = sum(out_w)
        return out_i, [x / s for x in out_w], 0.5 * float(self.S[layer]) * lost


def fit_rows(path: str, ctx: Context, who: str) -> np.ndarray:
    """The profile trace's top-k ids [T', L, k] for knob `who`: its decode rows, or every row when it
    has none. Its errors are `UserError`s naming `who`."""
    from policies.fit import fit_trace
    from sim.errors import UserError

    try:
        fit = fit_trace(path, ctx, who)
    except UserError as err:  # one that does not say which knob (a folder not found): name it
        if str(err).startswith(who):
            raise
        raise UserError(f"{who}={path}: {err}") from None
    return fit.experts[fit.is_decode] if fit.is_decode.any() else fit.experts
