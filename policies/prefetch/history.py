"""`history`: predict from recent tokens' activation patterns (in the spirit of MoE-Infinity).

Keeps the experts each of the last `window` decode tokens ran at every layer. After layer l gates,
each past token j scores `sim_j = |A_j(l) ∩ A_t(l)|` (how alike its activation at this layer is
to the current token's); a candidate expert e of layer l+d scores the sum of `sim_j + eps` over
past tokens j that ran e at l+d. The `count` best not-present experts are prefetched
(ties: lower id). Uses only the past and the current layer's decision.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from policies.base import Context, PrefetchPolicy
from policies.prefetch.pick import first_absent
from policies.registry import PREFETCH
from sim.errors import UserError


@PREFETCH.register("history")
class History(PrefetchPolicy):
    @dataclass
    class Knobs:
        window: int = 16
        depth: int = 1
        count: int = 1

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.window < 1 or knobs.depth < 1 or knobs.count < 1:
            raise UserError("prefetch.window, prefetch.depth and prefetch.count must be >= 1")
        plan = ctx.gating_plan
        ids = plan.ids if plan is not None else ctx.trace.experts
        self.ids = [[frozenset(int(e) for e in row if e >= 0) for row in tok] for tok in ids.tolist()]
        self.past: deque[int] = deque(maxlen=knobs.window)  # past decode token indices
        self.last_t = -1

    def on_layer(self, t: int, layer: int) -> list[int]:
        if t != self.last_t:  # a new token: the previous one joins the history
            if self.last_t >= 0:
                self.past.append(self.last_t)
            self.last_t = t
        L, E = self.ctx.layers, self.ctx.experts
        present = self.ctx.cache.is_present
        now = self.ids[t][layer]
        out: list[int] = []
        for d in range(1, self.knobs.depth + 1):
            target = layer + d
            if target >= L:
                break
            score = [0.0] * E
            for j in self.past:
                sim = len(self.ids[j][layer] & now) + 1e-3
                for e in self.ids[j][target]:
                    score[e] += sim
            ranked = sorted((e for e in range(E) if score[e] > 0), key=lambda e: (-score[e], e))
            out += first_absent((target * E + e for e in ranked), present, self.knobs.count)
        return out
