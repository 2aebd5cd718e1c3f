"""`oracle`: prefetch exactly the experts that will run (reads the future; a bound).

After layer l of decode token t gates, walk the future decode steps in order ((t, l+1), (t, l+2),
..., then the next decode tokens) and name the experts that will run and are not on the device,
until `depth` steps have been walked or, with `depth=0` (the default), until as many distinct
future experts as the cache holds have been seen (looking further cannot help: they could not
all be resident). The engine issues them in that order and stops at the first one the cache
refuses (`stop_at_first_skip`): with `belady` a prefetch that would evict something needed sooner
is refused, and every later one would be too. Uses the gating plan when the gating policy is
stateless, else the trace's top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, PrefetchPolicy
from policies.registry import PREFETCH
from sim.errors import UserError


@PREFETCH.register("oracle")
class Oracle(PrefetchPolicy):
    stop_at_first_skip = True

    @dataclass
    class Knobs:
        depth: int = 0  # future steps to look at; 0: as many distinct experts as the cache holds

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.depth < 0:
            raise UserError("prefetch.depth must be >= 0 (0: as far as the cache can use)")
        plan = ctx.gating_plan
        ids = plan.ids if plan is not None else ctx.trace.experts.astype(np.int64)
        L, E = ctx.layers, ctx.experts
        dec = np.flatnonzero(ctx.trace.is_decode)
        keys = np.where(ids >= 0, ids + (np.arange(L) * E)[None, :, None], -1)[dec]  # [D, L, k]
        self.steps = [[k for k in row if k >= 0] for row in keys.reshape(-1, keys.shape[-1]).tolist()]
        self.step_of = {int(t): i * L for i, t in enumerate(dec)}  # token -> its first step
        self.limit = knobs.depth if knobs.depth else None
        self.capacity = max(1, ctx.capacity_slots)

    def on_layer(self, t: int, layer: int) -> list[int]:
        present = self.ctx.cache.is_present
        out: list[int] = []
        seen: set[int] = set()
        s = self.step_of[t] + layer + 1
        end = len(self.steps) if self.limit is None else min(len(self.steps), s + self.limit)
        while s < end:
            for k in self.steps[s]:
                if k not in seen:
                    seen.add(k)
                    if not present(k):
                        out.append(k)
            if self.limit is None and len(seen) >= self.capacity:
                break
            s += 1
        return out
