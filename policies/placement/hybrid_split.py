"""`hybrid_split`: split each step's missed experts between loading and the CPU, by cost (HybriMoE).

Source: Zhong et al., "HybriMoE: Hybrid CPU-GPU Scheduling and Cache Management for Efficient MoE
Inference" (arXiv 2504.05897, 2025), its dynamic intra-layer scheduling: per layer, the experts
that are not on the GPU are divided between CPU compute and transfer-then-GPU compute so that the
layer finishes earliest, instead of a fixed rule per expert (`cpu_on_miss`, `cost_based`).

Rule, at each (token t, layer l): with `r` active experts on the device (resident or loading) and
`M` missed ones, loading `m` of the misses and computing the other `M - m` on the CPU finishes at

    finish(m) = max((M - m) * cpu_s,  device(m))
    device(m):  d = r * expert_s; for j = 1..m: d = max(d, ceil(j / channels) * load_s) + expert_s

(the device computes its residents first, then each loaded expert once it has arrived, as the
engine does; `load_s = link latency + expert_bytes / bandwidth`, `expert_s` and `cpu_s` one expert
on one token, uncontended, from the cost model `sim/machine/cost.py`). Every miss costs the same,
so the exact optimum is the least `m` over 0..M of finish(m) (ties: the larger m, i.e. load). The
first `m` missed experts in the step's order (the gating's: highest weight first) are loaded, the
rest go to the CPU. The whole assignment is computed on the first `place` call of a (t, l), from
the step's active experts (`ctx.gating_plan` when the gating is stateless, else the trace's top-k
there) and `ctx.cache.is_present`; an expert `place` is asked about that is not in that set (a
stateful gating's substitute, another row of a serving batch) is placed greedily, the better
of the two given the step's assignment so far (ties: load).

Simplified relative to HybriMoE: the link is assumed idle at the step's start (prefetches in
flight are not seen), memory contention and the CPU's per-expert token counts of a batch are not
modelled, and HybriMoE's impact-driven prefetch and score-based (MRS) cache are not part of it
(combine with a prefetch and cache policy of your choice). Needs the offloaded experts in host
memory (`expert_tier: host`, as `cpu_on_miss`); refused otherwise, a `UserError` naming it.
"""

from __future__ import annotations

import math

from policies.base import CPU, LOAD, Context, PlacementPolicy
from policies.placement.cpu_on_miss import require_host_experts
from policies.registry import PLACEMENT


def device_finish_s(on_device: int, loaded: int, expert_s: float, load_s: float, channels: int) -> float:
    """When the device has computed `on_device` present experts, then `loaded` demand loads (each
    once it has arrived, `channels` copies at a time, every copy `load_s`), from the step's gate."""
    d = on_device * expert_s
    for j in range(1, loaded + 1):
        d = max(d, math.ceil(j / channels) * load_s) + expert_s
    return d


def best_split(on_device: int, missed: int, expert_s: float, load_s: float, cpu_s: float,
               channels: int) -> int:
    """How many of `missed` experts to load (the rest on the CPU) so that the step ends earliest
    (the module docstring's finish(m)); ties: more loads."""
    best_m, best_s = missed, math.inf
    for m in range(missed, -1, -1):  # from all loaded down: a tie keeps the larger m
        s = max((missed - m) * cpu_s, device_finish_s(on_device, m, expert_s, load_s, channels))
        if s < best_s:
            best_m, best_s = m, s
    return best_m


@PLACEMENT.register("hybrid_split")
class HybridSplit(PlacementPolicy):
    may_use_cpu = True

    def __init__(self, knobs: object, ctx: Context):
        super().__init__(knobs, ctx)
        require_host_experts(ctx, "hybrid_split")
        cost = ctx.cost
        self.load_s = cost.load_s(cost.expert_bytes)
        self.expert_s = cost.expert_s
        self.cpu_s = cost.expert_compute_s(1, on_cpu=True)
        self.channels = max(1, int(ctx.hw.expert_link.channels))
        self.E = ctx.experts
        self._step: tuple[int, int] | None = None  # the (t, layer) whose assignment is held
        self._choice: dict[int, str] = {}  # key -> LOAD / CPU for that step
        self._on_device = 0
        self._loads = self._cpus = 0  # the step's assignment so far: loads, CPU experts (for the greedy fallback)

    def _active(self, t: int, layer: int) -> list[int]:
        plan = self.ctx.gating_plan
        row = plan.ids[t, layer] if plan is not None else self.ctx.trace.experts[t, layer]
        base = layer * self.E
        return [base + int(e) for e in row if e >= 0]

    def _plan_step(self, t: int, layer: int) -> None:
        present = self.ctx.cache.is_present
        keys = self._active(t, layer)
        missed = [k for k in keys if not present(k)]
        self._on_device = len(keys) - len(missed)
        m = best_split(self._on_device, len(missed), self.expert_s, self.load_s, self.cpu_s, self.channels)
        self._choice = {k: (LOAD if i < m else CPU) for i, k in enumerate(missed)}
        self._step = (t, layer)
        self._loads, self._cpus = m, len(missed) - m

    def place(self, key: int, t: int, weight: float) -> str:
        layer = key // self.E
        if self._step != (t, layer):
            self._plan_step(t, layer)
        where = self._choice.get(key)
        if where is None:  # not in the planned set: the better of the two given the step so far
            load = max(self._cpus * self.cpu_s,
                       device_finish_s(self._on_device, self._loads + 1, self.expert_s, self.load_s, self.channels))
            cpu = max((self._cpus + 1) * self.cpu_s,
                      device_finish_s(self._on_device, self._loads, self.expert_s, self.load_s, self.channels))
            where = LOAD if load <= cpu else CPU
            self._choice[key] = where
            if where == LOAD:
                self._loads += 1
            else:
                self._cpus += 1
        return where
