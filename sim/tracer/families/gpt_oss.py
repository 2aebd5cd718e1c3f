"""gpt-oss: router logits with a bias; top-k of the logits, then softmax over the chosen k (so the
weights sum to one). The MoE block (`mlp`, router attribute `router`) returns a tuple
`(hidden_states, router_scores)`. Experts carry biases and a clamped SwiGLU; transformers 5.x
calls them with top-k shaped `(indices [N, k], weights [N, k])` like every other family (4.x
took dense `[N, E]` weights), so the shared one-hot, weight-one call computes E_i(x)."""

from __future__ import annotations

from typing import Any

import torch

from sim.tracer.families.base import Family


class GptOss(Family):
    model_types = ("gpt_oss",)
    router_attr = "router"
    routing = "topk_softmax"

    def renormalize(self, config: Any) -> bool:
        return True

    def routing_detail(self, config: Any) -> dict[str, Any]:
        return {"router_bias": True}

    @staticmethod
    def block_tensor(output: Any) -> torch.Tensor:
        return output[0]

    @staticmethod
    def with_block_tensor(output: Any, tensor: torch.Tensor) -> Any:
        return (tensor, *output[1:])
