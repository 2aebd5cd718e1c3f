"""Tiny randomly initialised checkpoints of every supported family, built offline (for tests).

`save_tiny(path, family)` writes a Hugging Face folder (config, safetensors weights, a byte-level
tokenizer with 256 tokens and no merges) that `sim trace` loads like a real checkpoint. Shapes
are chosen to exercise each family's peculiarities: Qwen2-MoE has a shared expert and a dense
first layer, DeepSeek has a dense first layer, expert groups and shared experts, Qwen3-MoE top-4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 256
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    num_attention_heads=2,
    num_key_value_heads=1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    max_position_embeddings=512,
)


def tiny_config(family: str, **overrides: Any) -> Any:
    import transformers as tf

    deepseek = dict(
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=3,
        num_key_value_heads=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=8,
        q_lora_rank=None,
        qk_rope_head_dim=4,
        v_head_dim=8,
        qk_nope_head_dim=4,
        n_group=2,
        topk_group=1,
    )
    table: dict[str, tuple[Any, dict[str, Any]]] = {
        "mixtral": (
            tf.MixtralConfig,
            dict(intermediate_size=32, num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2),
        ),
        "qwen2_moe": (
            tf.Qwen2MoeConfig,
            dict(
                intermediate_size=32,
                moe_intermediate_size=8,
                shared_expert_intermediate_size=16,
                num_hidden_layers=3,
                num_experts=4,
                num_experts_per_tok=2,
                mlp_only_layers=[0],
                norm_topk_prob=False,
            ),
        ),
        "qwen3_moe": (
            tf.Qwen3MoeConfig,
            dict(
                intermediate_size=32,
                moe_intermediate_size=8,
                num_hidden_layers=2,
                head_dim=8,
                num_experts=8,
                num_experts_per_tok=4,
                norm_topk_prob=True,
            ),
        ),
        "olmoe": (
            tf.OlmoeConfig,
            dict(intermediate_size=32, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2),
        ),
        "deepseek_v2": (tf.DeepseekV2Config, dict(deepseek, topk_method="group_limited_greedy")),
        "deepseek_v3": (tf.DeepseekV3Config, dict(deepseek)),
        "gpt_oss": (
            tf.GptOssConfig,
            dict(
                intermediate_size=8,
                num_hidden_layers=2,
                head_dim=8,
                num_local_experts=4,
                num_experts_per_tok=2,
                sliding_window=8,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                layer_types=["sliding_attention", "full_attention"],
            ),
        ),
        "phimoe": (
            tf.PhimoeConfig,
            dict(intermediate_size=32, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
        ),
        "llama": (tf.LlamaConfig, dict(intermediate_size=32, num_hidden_layers=2)),  # dense: not traceable
    }
    cls, kw = table[family]
    return cls(**{**_COMMON, **kw, **overrides})


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 tokens, one per byte, no merges, no special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny(path: str | Path, family: str, *, seed: int = 0, scale: float = 1.0, **overrides: Any) -> Path:
    """Write a tiny random checkpoint of `family` to `path`; `scale` multiplies the init std
    (a larger std gives less uniform routing and logits, hence fewer near-ties)."""
    import transformers as tf

    config = tiny_config(family, **overrides)
    config.initializer_range = config.initializer_range * scale
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    path = Path(path)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
