"""Mixtral: softmax over all experts, top-k, renormalised over the chosen k (always)."""

from __future__ import annotations

from typing import Any

from sim.tracer.families.base import Family


class Mixtral(Family):
    model_types = ("mixtral",)
    routing = "softmax_topk"

    def renormalize(self, config: Any) -> bool:
        return True
