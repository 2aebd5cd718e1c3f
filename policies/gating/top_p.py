"""`top_p`: run the smallest prefix of the top-k experts whose renormalised weight reaches `p`.

dL of each decision: the Fisher estimate `1/2 * S_l * (dropped weight)^2` (S_l from the
`sensitivity` knob; 0 when `sensitivity=none`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, GatingPlan, GatingPolicy
from policies.published import sensitivities_or_none
from policies.registry import GATING
from sim.errors import UserError


@GATING.register("top_p")
class TopP(GatingPolicy):
    reads_weights = True  # decides by the gating weights
    @dataclass
    class Knobs:
        p: float = 0.9
        sensitivity: str = "trace"  # for dL only: trace | published | FILE | none

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if not 0 < knobs.p <= 1:
            raise UserError(f"gating.p must be in (0, 1], got {knobs.p}")
        self.S = sensitivities_or_none(knobs.sensitivity, ctx)

    def plan(self) -> GatingPlan:
        tr = self.ctx.trace
        w = tr.weights.astype(np.float64)
        w = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
        before = np.cumsum(w, axis=-1) - w  # weight of the experts ranked above each one
        keep = before < self.knobs.p - 1e-12  # keep an expert while the prefix before it is short of p
        keep[..., 0] = True
        ids = np.where(keep, tr.experts, -1).astype(np.int64)
        kept = np.where(keep, w, 0.0)
        dropped = 1.0 - kept.sum(-1)
        return GatingPlan(ids=ids, weights=kept / kept.sum(-1, keepdims=True),
                          dL=0.5 * self.S[None, :] * dropped**2)
