"""The family adapter interface and the behaviour most families share.

A `Family` knows, for one `config.model_type`, where the MoE blocks of a loaded model are, what
their router and experts modules are called, the routing rule (a name for `meta.yaml`), and the
sizes of shared experts. Everything else (computing one expert, reading the block output) is the
same for every family that transformers 5.x ships, because all of them use a router module that
returns `(router_logits, top_k_weights, top_k_indices)` and an experts module called as
`experts(hidden [N, H], top_k_index [N, k], top_k_weights [N, k]) -> [N, H]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class MoELayer:
    """One MoE block of a loaded model. `index` is the MoE-layer ordinal (the trace's `layer`)."""

    index: int
    decoder_index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module


class Family:
    """Base adapter. Subclasses set the class attributes and override what differs."""

    model_types: tuple[str, ...] = ()
    router_attr: str = "gate"  # attribute of the MoE block holding the router module
    experts_attr: str = "experts"
    routing: str = "softmax_topk"  # name of the routing rule recorded in meta.yaml

    # ------------------------------------------------------------------ description (config only)
    def renormalize(self, config: Any) -> bool:
        """Whether the recorded top-k weights sum to one (before any scaling factor)."""
        return bool(getattr(config, "norm_topk_prob", True))

    def routing_detail(self, config: Any) -> dict[str, Any]:
        """Extra facts about the routing rule (scaling factors, groups), for `source`."""
        return {}

    def shared_experts(self, config: Any) -> tuple[int, int]:
        """(number of always-on shared experts, intermediate width of one)."""
        return 0, 0

    # ------------------------------------------------------------------ structure (loaded model)
    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)

    def is_moe(self, block: nn.Module) -> bool:
        return hasattr(block, self.router_attr) and hasattr(block, self.experts_attr)

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        out: list[MoELayer] = []
        for i, layer in enumerate(self.decoder_layers(model)):
            block = layer.mlp
            if self.is_moe(block):
                router = getattr(block, self.router_attr)
                experts = getattr(block, self.experts_attr)
                out.append(MoELayer(len(out), i, block, router, experts))
        return out

    @staticmethod
    def num_experts(layer: MoELayer) -> int:
        return int(layer.router.num_experts)

    @staticmethod
    def top_k(layer: MoELayer) -> int:
        return int(layer.router.top_k)

    @staticmethod
    def expert_width(layer: MoELayer) -> int:
        ex = layer.experts
        return int(getattr(ex, "intermediate_dim", None) or getattr(ex, "intermediate_size", 0))

    # ------------------------------------------------------------------ computation
    @staticmethod
    def block_tensor(output: Any) -> torch.Tensor:
        """The hidden-state tensor of an MoE block's output [B, S, H]."""
        return output

    @staticmethod
    def with_block_tensor(output: Any, tensor: torch.Tensor) -> Any:
        """`output` with its hidden-state tensor replaced (same structure)."""
        return tensor

    def expert_output(self, layer: MoELayer, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """E_i(x) for each row: `x` [N, H], `expert` [N] ids -> [N, H], unweighted (weight 1).

        Calls the model's own experts module with a top-1 routing of weight one, so the expert
        arithmetic (activation, biases, clamps, the configured experts kernel) is the model's.
        """
        device = next(layer.experts.parameters()).device
        x = x.to(device)
        index = expert.to(device=device, dtype=torch.long).reshape(-1, 1)  # [N, 1]
        weight = torch.ones(index.shape, dtype=x.dtype, device=device)  # [N, 1]
        return layer.experts(x, index, weight)
