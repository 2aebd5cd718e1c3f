"""`pregate`: prefetch the experts that layer l+d's router picks from layer l's MoE input.

AdapMoE / mixtral-offloading's speculative loading (reference section 2). After layer l gates,
for each depth d = 1..`depth` (target layer l+d), take the top-`top_k` experts of the trace's
`pregate_d` logits at (t, l) in rank order and prefetch the first `count` that are neither
resident nor loading. Decode tokens only (the engine does not call prefetch during prefill).
Tie-break: rank order of the pre-gating logits (stable argsort: lower id first on equal logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import Context, PrefetchPolicy
from policies.registry import PREFETCH
from sim.errors import UserError


@PREFETCH.register("pregate")
class Pregate(PrefetchPolicy):
    @dataclass
    class Knobs:
        depth: int = 1  # how many layers ahead (needs pregate_1..depth in the trace)
        count: int = 1  # experts prefetched per target layer
        wait: bool = False  # the target layer waits for in-flight prefetches, used or not (AdapMoE)

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.depth < 1 or knobs.count < 1:
            raise UserError("prefetch.depth and prefetch.count must be >= 1")
        tr = ctx.trace
        missing = [d for d in range(1, knobs.depth + 1) if d not in tr.pregate]
        if missing:
            raise UserError(
                f"prefetch 'pregate' with depth={knobs.depth} needs trace columns "
                f"{', '.join(f'pregate_{d}' for d in missing)}, which this trace lacks "
                f"(has: {sorted(tr.pregate) or 'none'}); use prefetch.depth=1 or another prefetch policy"
            )
        k = ctx.top_k
        E = ctx.experts
        # predictions[d]: [T, L, k] expert ids in rank order (keys of target layer l + d)
        self.pred: dict[int, list] = {}
        for d in range(1, knobs.depth + 1):
            ids = np.argsort(-tr.pregate[d], axis=-1, kind="stable")[..., :k]  # [T, L, k]
            keys = ids + (np.arange(ctx.layers)[None, :, None] + d) * E  # key in layer l + d
            self.pred[d] = keys.tolist()  # nested lists: fast scalar access on the hot path

    @property
    def wait_for_prefetch(self) -> bool:
        return self.knobs.wait

    def on_layer(self, t: int, layer: int) -> list[int]:
        out: list[int] = []
        present = self.ctx.cache.is_present
        last = self.ctx.layers - 1
        for d in range(1, self.knobs.depth + 1):
            if layer + d > last:
                break
            n = 0
            for key in self.pred[d][t][layer]:
                if not present(key):
                    out.append(key)
                    n += 1
                    if n == self.knobs.count:
                        break
        return out
