"""`oracle`: the best offline schedule of prefetches and evictions we know (reads the future; a bound).

Cao et al.'s *Conservative* integrated prefetching and caching, adapted to the engine
(`sim/offline/schedule.py`): the loads of `belady` without prefetch (exact MIN for the step
semantics), each issued by this policy's prefetch hook as soon as the expert it evicts is no
longer needed before it, in MIN's order; those MIN caches nowhere wait in staging buffers; loads
of a prefill stay demand loads at their step. The cache policy must be `belady`, which then evicts exactly as planned
(`follow`). Never slower than `belady` without prefetch on the same gating (tests).

The schedule is planned from the gating plan, so the gating policy must be stateless (one that
decides from the cache state changes what is needed as the schedule changes the cache; `run`
refuses that combination). Placement: missed experts are loaded (the schedule plans loads).
"""

from __future__ import annotations

from policies.base import Context, PrefetchPolicy
from policies.registry import PREFETCH
from sim.errors import UserError


@PREFETCH.register("oracle")
class Oracle(PrefetchPolicy):
    reads_replay_future = True  # an offline schedule of the replay's steps
    stage_without_slot = True  # the loads MIN bypasses wait for their step in staging buffers
    def __init__(self, knobs: object, ctx: Context):
        super().__init__(knobs, ctx)
        if ctx.gating_plan is None:
            raise UserError("prefetch 'oracle' plans its schedule from the gating decisions, but this gating "
                            "policy decides from the cache state at run time; use a stateless gating "
                            "(topk, adapmoe, top_p)")
        from sim.offline.schedule import conservative

        self.schedule = conservative(ctx)
        self.steps = ctx.steps()

    def on_layer(self, t: int, layer: int) -> list[int]:
        return self.schedule.due(self.steps.step_of(t, layer))
