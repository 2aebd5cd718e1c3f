"""`drop_on_miss`: skip an active expert that is not on the device when its weight is small.

At decision time, an expert of the model's top-k that is neither resident nor loading and whose
renormalised weight is below `w_max` is not run (the rest are renormalised); the top-1 expert is
always run. Lossy: dL = 1/2 * S_l * (dropped weight)^2 (Fisher estimate, as in `adapmoe`).
Stateful (reads the cache), so it decides per (token, layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, GatingPlan, GatingPolicy
from policies.published import sensitivities_or_none
from policies.registry import GATING


def kept_whatever_the_cache(trace, w_max: float) -> GatingPlan:
    """Top-1 and every expert of renormalised weight >= `w_max` ([T, L, k] ids, -1 elsewhere)."""
    w = trace.weights.astype(np.float64)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
    keep = w >= w_max
    keep[..., 0] = True
    T, L, _ = w.shape
    return GatingPlan(ids=np.where(keep, trace.experts, -1).astype(np.int64), weights=np.where(keep, w, 0.0),
                      dL=np.zeros((T, L)))


@GATING.register("drop_on_miss")
class DropOnMiss(GatingPolicy):
    reads_weights = True  # decides by the gating weights
    @dataclass
    class Knobs:
        w_max: float = 0.2  # drop a missed expert whose renormalised weight is below this
        sensitivity: str = "trace"  # for dL: trace | published | FILE | none

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        self.S = sensitivities_or_none(knobs.sensitivity, ctx)
        self.ids = ctx.trace.experts.tolist()
        self.w = ctx.trace.weights.tolist()

    def bound_plan(self) -> GatingPlan:
        """The experts it runs whatever the cache holds: it drops only a missed non-top-1 expert below `w_max`."""
        return kept_whatever_the_cache(self.ctx.trace, self.knobs.w_max)

    def decide(self, t: int, layer: int) -> tuple[list[int], list[float], float]:
        ids, w = self.ids[t][layer], self.w[t][layer]
        total = sum(w)
        present = self.ctx.cache.is_present
        base = layer * self.ctx.experts
        keep_i, keep_w, dropped = [], [], 0.0
        for j, (e, x) in enumerate(zip(ids, w, strict=True)):
            x /= total
            if j > 0 and x < self.knobs.w_max and not present(base + e):
                dropped += x
                continue
            keep_i.append(e)
            keep_w.append(x)
        s = sum(keep_w)
        return keep_i, [x / s for x in keep_w], 0.5 * float(self.S[layer]) * dropped**2
