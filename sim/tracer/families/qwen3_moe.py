"""Qwen3-MoE: softmax-then-top-k (`norm_topk_prob` renormalises), no shared expert, dense
MLP layers where `mlp_only_layers` or `decoder_sparse_step` say so."""

from __future__ import annotations

from typing import Any

from sim.tracer.families.base import Family


class Qwen3Moe(Family):
    model_types = ("qwen3_moe",)
    routing = "softmax_topk"

    def renormalize(self, config: Any) -> bool:
        return bool(config.norm_topk_prob)
