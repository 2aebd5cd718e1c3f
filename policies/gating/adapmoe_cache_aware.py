"""`adapmoe_cache_aware` (ours): AdapMoE's rule with a budget that depends on cache residency.

Idea: dropping an expert that is already on the device saves no time, only accuracy; dropping
one that must be loaded saves a whole transfer. So spend the loss budget where it buys latency:
drop a non-top-1 expert (lowest weight first, as in `adapmoe`) while `S_l * dropped^2 < T_miss`
if it is absent from the device, and while `S_l * dropped^2 < T_hit` if it is resident or
loading. With `T_hit = 0` a resident expert always runs, which lowers dL at no cost; `T_miss >
T` spends that saving on more drops of missing experts. dL = 1/2 * S_l * dropped^2, as in
`adapmoe`. Stateful (reads the cache), so it decides per (token, layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, GatingPlan, GatingPolicy
from policies.gating.adapmoe import drop_plan
from policies.published import sensitivities
from policies.registry import GATING


@GATING.register("adapmoe_cache_aware")
class AdapMoECacheAware(GatingPolicy):
    reads_weights = True  # decides by the gating weights
    @dataclass
    class Knobs:
        T_miss: float = 0.01  # budget for dropping an expert that would have to be loaded
        T_hit: float = 0.0  # budget for dropping an expert already on the device
        sensitivity: str = "trace"
        per_token: bool = False

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        tr = ctx.trace
        self.S = tr.fisher.astype(np.float64) if knobs.per_token else sensitivities(knobs.sensitivity, ctx)
        self.per_token = knobs.per_token
        self.ids = tr.experts.tolist()
        w = tr.weights.astype(np.float64)
        self.w = (w / np.maximum(w.sum(-1, keepdims=True), 1e-30)).tolist()

    def bound_plan(self) -> GatingPlan:
        """Whatever the cache holds, it keeps at least what `adapmoe`'s rule keeps under the larger
        of its two budgets (a smaller budget drops no more)."""
        tr = self.ctx.trace
        S = self.S if self.per_token else np.asarray(self.S, dtype=np.float64)
        return drop_plan(tr.experts.astype(np.int64), tr.weights, S, max(self.knobs.T_miss, self.knobs.T_hit))

    def decide(self, t: int, layer: int) -> tuple[list[int], list[float], float]:
        ids, w = self.ids[t][layer], self.w[t][layer]
        S = float(self.S[t, layer] if self.per_token else self.S[layer])
        present = self.ctx.cache.is_present
        base = layer * self.ctx.experts
        n, dropped = len(ids), 0.0
        while n > 1:  # try to drop the lowest-weight remaining expert
            budget = self.knobs.T_hit if present(base + ids[n - 1]) else self.knobs.T_miss
            if S * (dropped + w[n - 1]) ** 2 < budget:
                dropped += w[n - 1]
                n -= 1
            else:
                break
        kept = sum(w[:n])
        return ids[:n], [x / kept for x in w[:n]], 0.5 * S * dropped * dropped
