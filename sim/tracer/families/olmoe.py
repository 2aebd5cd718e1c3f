"""OLMoE: softmax-then-top-k; renormalised only if `norm_topk_prob` (False in OLMoE-1B-7B)."""

from __future__ import annotations

from typing import Any

from sim.tracer.families.base import Family


class Olmoe(Family):
    model_types = ("olmoe",)
    routing = "softmax_topk"

    def renormalize(self, config: Any) -> bool:
        return bool(config.norm_topk_prob)
