"""The toy model's configuration: Mixtral's routing shape at a tiny width.

    32 decoder layers, each an MoE block of 8 SwiGLU experts with top-2 softmax routing (renormalised),
    hidden 64, expert width 64, 4 query heads / 2 KV heads of dim 16, RoPE (theta 1e4),
    vocab 256 (one token per byte), untied embeddings; float32 weights.

Parameters (defaults): 32 x 8 experts x 3 x 64 x 64 = 3,145,728 expert weights, 446,528 others,
3,592,256 in all = ~14.4 MB as float32 safetensors. Width 64 keeps a 2,048-token training step
under a second on two CPU cores; the shape (not the size) is what the simulator replays, and a
model preset supplies Mixtral-8x7B's sizes for what-if runs (DESIGN 3.2).

The checkpoint is a plain Hugging Face `MixtralForCausalLM` folder, so the tracer loads it with
`AutoModelForCausalLM` like any other checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sim.errors import UserError

BYTE_VOCAB = 256


@dataclass
class ToyModelConfig:
    """What can be changed (tests use a reduced one; the bundled checkpoint uses the defaults)."""

    layers: int = 32  # decoder layers, every one an MoE layer
    hidden: int = 64
    intermediate: int = 64  # width of one expert (SwiGLU: gate, up [hidden -> width], down)
    heads: int = 4
    kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    context: int = 256  # max_position_embeddings: the training sequence length
    rope_theta: float = 10000.0

    def check(self) -> None:
        """Raise UserError for an impossible shape."""
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "experts", "top_k", "context"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise UserError(f"model.hidden={self.hidden} is not a multiple of model.heads={self.heads}")
        if self.heads % self.kv_heads:
            raise UserError(f"model.heads={self.heads} is not a multiple of model.kv_heads={self.kv_heads}")
        if (self.hidden // self.heads) % 2:
            raise UserError("model.hidden / model.heads must be even (RoPE rotates pairs)")
        if self.top_k > self.experts:
            raise UserError(f"model.top_k={self.top_k} exceeds model.experts={self.experts}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def expert_params(self) -> int:
        return self.layers * self.experts * 3 * self.hidden * self.intermediate


def hf_config(cfg: ToyModelConfig, router_aux_loss_coef: float = 0.0) -> Any:
    """The `MixtralConfig` of `cfg` (no special tokens: the vocabulary is exactly the 256 bytes)."""
    from transformers import MixtralConfig

    cfg.check()
    return MixtralConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        num_local_experts=cfg.experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=cfg.context,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        router_aux_loss_coef=router_aux_loss_coef,
        output_router_logits=False,
        dtype="float32",
    )


def build_model(cfg: ToyModelConfig, seed: int, router_aux_loss_coef: float = 0.0) -> Any:
    """A freshly initialised float32 `MixtralForCausalLM`; same `cfg` + `seed` -> same weights."""
    import torch
    from transformers import MixtralForCausalLM

    config = hf_config(cfg, router_aux_loss_coef)
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).float()


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
