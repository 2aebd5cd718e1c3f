"""`adapmoe`: sensitivity-based adaptive gating (AdapMoE, reference section 1), any top-k.

Top-2 (exactly as published): with renormalised top-2 weights (w1, w2), run only the true top-1
expert e1 (weight 1) when `w2 < sqrt(T / S_l)`; else run both with (w1, w2).
Top-k > 2 (our generalisation): drop the lowest-weight experts, one at a time, while
`S_l * (sum of dropped renormalised weights)^2 < T`; the kept experts' weights are renormalised.
This is the same inequality as the top-2 rule (it reduces to it for k = 2). The estimated loss
increase of each decision is the second-order Fisher estimate `dL = 1/2 * S_l * (dropped)^2`.

Knobs: `T` (the global budget; 0 reproduces `topk` exactly), `sensitivity` (`trace`,
`published`, or a file; see policies/published.py), `per_token` (use the trace's per-token
`fisher` instead of the layer mean S_l: a finer, generalised rule), `min_experts` (never run
fewer; default 1). Stateless: all decisions are computed at once with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, GatingPlan, GatingPolicy
from policies.published import sensitivities
from policies.registry import GATING
from sim.errors import UserError


def drop_plan(ids: np.ndarray, w: np.ndarray, S: np.ndarray, T: float, min_experts: int = 1) -> GatingPlan:
    """ids, w [T, L, k] (rank order, w renormalised); S [T, L] or [L] -> the adaptive plan.

    Drops the lowest-ranked experts while S * dropped^2 < T (strict), keeping `min_experts`.
    """
    Tn, L, k = ids.shape
    S = np.broadcast_to(S, (Tn, L)) if S.ndim == 1 else S
    w = w.astype(np.float64)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
    # dropped mass if we drop the last j experts, j = 0..k-1: suffix sums [T, L, k]
    suffix = np.concatenate([np.zeros((Tn, L, 1)), np.cumsum(w[..., ::-1], axis=-1)[..., :-1]], axis=-1)
    ok = S[..., None] * suffix**2 < T  # [T, L, k]: dropping j experts is within budget
    ok[..., 0] = True
    # monotone: the dropped mass grows with j, so the allowed j form a prefix
    n_drop = np.minimum(ok.cumprod(axis=-1).sum(-1) - 1, k - min_experts)  # [T, L]
    keep = np.arange(k)[None, None, :] < (k - n_drop)[..., None]  # [T, L, k]
    new_ids = np.where(keep, ids, -1).astype(np.int64)
    kept_w = np.where(keep, w, 0.0)
    new_w = kept_w / kept_w.sum(-1, keepdims=True)
    dropped = np.take_along_axis(suffix, n_drop[..., None], axis=-1)[..., 0]
    return GatingPlan(ids=new_ids, weights=new_w, dL=0.5 * S * dropped**2)


@GATING.register("adapmoe")
class AdapMoE(GatingPolicy):
    @dataclass
    class Knobs:
        T: float = 0.005
        sensitivity: str = "trace"  # trace | published | FILE
        per_token: bool = False  # use per-token fisher from the trace instead of S_l
        min_experts: int = 1

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.T < 0:
            raise UserError(f"gating.T must be >= 0, got {knobs.T}")
        if not 1 <= knobs.min_experts <= ctx.top_k:
            raise UserError(f"gating.min_experts must be in 1..{ctx.top_k}")
        if knobs.per_token:
            if ctx.trace.fisher is None:
                raise UserError("gating.per_token=true needs the trace's per-token 'fisher' column")
            self.S = ctx.trace.fisher.astype(np.float64)
        else:
            self.S = sensitivities(knobs.sensitivity, ctx)

    def plan(self) -> GatingPlan:
        tr = self.ctx.trace
        return drop_plan(tr.experts.astype(np.int64), tr.weights, self.S, self.knobs.T, self.knobs.min_experts)
