"""`cost_based`: per missed expert, the cheaper of load-then-compute and CPU compute.

Load-then-compute costs `link.latency + expert_bytes / link.bandwidth + device expert time`;
CPU compute costs the CPU expert time (cost model, `sim/machine/cost.py`). Ties go to loading (it also
warms the cache). With `slack` > 1, loading is preferred unless the CPU is that many times faster.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.base import CPU, LOAD, Context, PlacementPolicy
from policies.registry import PLACEMENT


@PLACEMENT.register("cost_based")
class CostBased(PlacementPolicy):
    @dataclass
    class Knobs:
        slack: float = 1.0

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        from policies.placement.cpu_on_miss import require_host_experts

        require_host_experts(ctx, "cost_based")
        cost = ctx.cost
        self.load_total_s = cost.load_s(cost.expert_bytes) + cost.expert_s
        self.cpu_s = cost.expert_compute_s(1, on_cpu=True)
        self.choice = CPU if self.cpu_s * knobs.slack < self.load_total_s else LOAD
        self.may_use_cpu = self.choice == CPU

    def place(self, key: int, t: int, weight: float) -> str:
        return self.choice
