"""DeepSeek-V3: sigmoid scores; expert choice by score + `e_score_correction_bias` within the best
`topk_group` of `n_group` groups (a group's score = sum of its top-2); weights = the unbiased
sigmoid scores of the chosen experts, renormalised if `norm_topk_prob`, times
`routed_scaling_factor`. Shared experts always on; the first `first_k_dense_replace` layers dense."""

from __future__ import annotations

from typing import Any

from sim.tracer.families.base import Family


class DeepseekV3(Family):
    model_types = ("deepseek_v3",)
    routing = "sigmoid_grouped_topk"

    def renormalize(self, config: Any) -> bool:
        return bool(config.norm_topk_prob)

    def routing_detail(self, config: Any) -> dict[str, Any]:
        return {
            "routed_scaling_factor": float(config.routed_scaling_factor),
            "n_group": int(config.n_group),
            "topk_group": int(config.topk_group),
            "score_correction_bias": True,
        }

    def shared_experts(self, config: Any) -> tuple[int, int]:
        n = int(config.n_shared_experts or 0)
        return (n, int(config.moe_intermediate_size)) if n else (0, 0)
