"""DeepSeek-V2: softmax scores; `greedy` top-k or `group_limited_greedy` (best `topk_group` of
`n_group` groups by their max score, then top-k inside them); weights are NOT renormalised and
are multiplied by `routed_scaling_factor`. Shared experts always on; the first
`first_k_dense_replace` decoder layers are dense."""

from __future__ import annotations

from typing import Any

from sim.tracer.families.base import Family


class DeepseekV2(Family):
    model_types = ("deepseek_v2",)
    routing = "softmax_topk"

    def renormalize(self, config: Any) -> bool:
        return False

    def routing_detail(self, config: Any) -> dict[str, Any]:
        grouped = config.topk_method == "group_limited_greedy"
        detail: dict[str, Any] = {
            "topk_method": config.topk_method,
            "routed_scaling_factor": float(config.routed_scaling_factor),
        }
        if grouped:
            detail |= {"n_group": int(config.n_group), "topk_group": int(config.topk_group)}
        return detail

    def routing_name(self, config: Any) -> str:
        return "softmax_grouped_topk" if config.topk_method == "group_limited_greedy" else "softmax_topk"

    def shared_experts(self, config: Any) -> tuple[int, int]:
        n = int(config.n_shared_experts or 0)
        return (n, int(config.moe_intermediate_size)) if n else (0, 0)
