"""Registry of family adapters, keyed by `config.model_type` (one small module per family)."""

from __future__ import annotations

from typing import Any

from sim.errors import UserError
from sim.tracer.families.base import Family, MoELayer
from sim.tracer.families.deepseek_v2 import DeepseekV2
from sim.tracer.families.deepseek_v3 import DeepseekV3
from sim.tracer.families.gpt_oss import GptOss
from sim.tracer.families.mixtral import Mixtral
from sim.tracer.families.olmoe import Olmoe
from sim.tracer.families.phimoe import Phimoe
from sim.tracer.families.qwen2_moe import Qwen2Moe
from sim.tracer.families.qwen3_moe import Qwen3Moe

FAMILIES: dict[str, Family] = {}
for _cls in (Mixtral, Qwen2Moe, Qwen3Moe, Olmoe, DeepseekV2, DeepseekV3, GptOss, Phimoe):
    for _t in _cls.model_types:
        FAMILIES[_t] = _cls()


def family_for(config: Any, where: str = "checkpoint") -> Family:
    """The adapter for a transformers config; UserError for a model type we cannot trace."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        if not model_type:
            raise UserError(f"{where}: its config names no model_type, so the tracer cannot tell its family "
                            f"(supported MoE families: {supported})")
        raise UserError(
            f"{where}: the tracer does not support model type {model_type!r} (supported MoE families: "
            f"{supported}; a new family needs an adapter in sim/tracer/families/, docs/tracer.md)"
        )
    return FAMILIES[model_type]


def routing_name(family: Family, config: Any) -> str:
    """The routing rule's name, which for DeepSeek-V2 depends on `topk_method`."""
    fn = getattr(family, "routing_name", None)
    return fn(config) if fn else family.routing


__all__ = ["FAMILIES", "Family", "MoELayer", "family_for", "routing_name"]
