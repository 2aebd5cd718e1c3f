"""`oracle`: prefetch exactly the experts that will run (reads the future; a bound).

After layer l gates, prefetch the experts the gating plan runs at layers l+1..l+`depth` of this
token (wrapping to the next decode token's first layers past the last layer), in layer order.
Uses the gating plan when the gating policy is stateless, else the trace's top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, PrefetchPolicy
from policies.registry import PREFETCH
from sim.errors import UserError


@PREFETCH.register("oracle")
class Oracle(PrefetchPolicy):
    @dataclass
    class Knobs:
        depth: int = 1

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.depth < 1:
            raise UserError("prefetch.depth must be >= 1")
        plan = ctx.gating_plan
        ids = plan.ids if plan is not None else ctx.trace.experts.astype(np.int64)
        L, E = ctx.layers, ctx.experts
        keys = np.where(ids >= 0, ids + (np.arange(L) * E)[None, :, None], -1)
        self.keys = keys.tolist()
        dec = np.flatnonzero(ctx.trace.is_decode)
        self.next_decode = {int(a): int(b) for a, b in zip(dec[:-1], dec[1:], strict=True)}

    def on_layer(self, t: int, layer: int) -> list[int]:
        out: list[int] = []
        L = self.ctx.layers
        present = self.ctx.cache.is_present
        for d in range(1, self.knobs.depth + 1):
            tt, ll = t, layer + d
            if ll >= L:
                tt, ll = self.next_decode.get(t, -1), ll - L
                if tt < 0:
                    break
            out += [k for k in self.keys[tt][ll] if k >= 0 and not present(k)]
        return out
