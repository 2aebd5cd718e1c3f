"""Phi-MoE (Phi-3.5-MoE): `sparsemixer` top-2 routing. Expert 1 = argmax of the logits, weight =
softmax over the logits within a relative `router_jitter_noise` band of the max; expert 2 = the
argmax with expert 1 masked, weight from the same rule over the remaining logits. The two weights
do not sum to one. The router attribute is `router`."""

from __future__ import annotations

from typing import Any

from sim.tracer.families.base import Family


class Phimoe(Family):
    model_types = ("phimoe",)
    router_attr = "router"
    routing = "sparsemixer"

    def renormalize(self, config: Any) -> bool:
        return False

    def routing_detail(self, config: Any) -> dict[str, Any]:
        return {"router_jitter_noise": float(config.router_jitter_noise)}
