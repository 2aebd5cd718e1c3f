"""Qwen2-MoE: softmax-then-top-k (`norm_topk_prob` renormalises), one gated shared expert,
dense MLP layers where `mlp_only_layers` or `decoder_sparse_step` say so."""

from __future__ import annotations

from typing import Any

from sim.tracer.families.base import Family


class Qwen2Moe(Family):
    model_types = ("qwen2_moe",)
    routing = "softmax_topk"

    def renormalize(self, config: Any) -> bool:
        return bool(config.norm_topk_prob)

    def routing_detail(self, config: Any) -> dict[str, Any]:
        return {"shared_expert_gate": "sigmoid"}

    def shared_experts(self, config: Any) -> tuple[int, int]:
        width = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        return (1, width) if width > 0 else (0, 0)
