"""`substitute`: replace a missed low-weight expert with a resident expert of the same layer.

An expert of the top-k (not the top-1) that is neither resident nor loading, with renormalised
weight below `w_max`, is replaced by the resident expert of that layer with the highest router
logit (from the trace's `logits`; without logits, the most recently inserted resident) that is
not already active; with none resident, it is dropped. The substitute keeps the missed expert's
weight. dL estimate: 1/2 * S_l * w^2, i.e. a substitute is counted as no better than dropping
the expert (conservative: its output is not the missed expert's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, GatingPlan, GatingPolicy
from policies.gating.drop_on_miss import kept_whatever_the_cache
from policies.published import sensitivities_or_none
from policies.registry import GATING
from sim.engine.cache import RESIDENT


@GATING.register("substitute")
class Substitute(GatingPolicy):
    reads_weights = True  # decides by the gating weights
    @dataclass
    class Knobs:
        w_max: float = 0.2
        sensitivity: str = "trace"  # for dL: trace | published | FILE | none

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        self.S = sensitivities_or_none(knobs.sensitivity, ctx)
        tr = ctx.trace
        self.ids = tr.experts.tolist()
        self.w = tr.weights.tolist()
        # candidate order per (t, l): experts by descending router logit
        self.rank = np.argsort(-tr.logits, axis=-1, kind="stable").tolist() if tr.logits is not None else None

    def bound_plan(self) -> GatingPlan:
        """The experts it runs whatever the cache holds: it replaces only a missed non-top-1 expert below `w_max` (its substitute, a resident, is not counted)."""
        return kept_whatever_the_cache(self.ctx.trace, self.knobs.w_max)

    def decide(self, t: int, layer: int) -> tuple[list[int], list[float], float]:
        ids, w = self.ids[t][layer], self.w[t][layer]
        total = sum(w)
        cache = self.ctx.cache
        E = self.ctx.experts
        base = layer * E
        out_i, out_w, lost = [], [], 0.0
        for j, (e, x) in enumerate(zip(ids, w, strict=True)):
            x /= total
            if j == 0 or x >= self.knobs.w_max or cache.is_present(base + e):
                out_i.append(e)
                out_w.append(x)
                continue
            order = self.rank[t][layer] if self.rank is not None else range(E - 1, -1, -1)
            sub = next((c for c in order if c not in ids and c not in out_i
                        and cache.state[base + c] == RESIDENT), None)
            lost += x * x
            if sub is not None:
                out_i.append(sub)
                out_w.append(x)
        s = sum(out_w)
        return out_i, [x / s for x in out_w], 0.5 * float(self.S[layer]) * lost
