"""Model presets: how big a model's experts and layers are (DESIGN 3.2).

A trace says which experts run; a preset says how big they are. A run replays a trace's routing
with a preset's sizes, provided layers, experts and top-k match (`check_trace`). A model can also
come from a YAML file, a Hugging Face config.json or the trace itself, with `model.FIELD=`
overrides on top: `sim/machine/model_source.py`, docs/models.md.

Sizes are from each model's own `config.json` (docs/models.md). Quantisation: `bits` per expert
weight plus, for `group_size = g > 0`, `scale_bits` per group for the scale and zero point. The default `scale_bits = 16` (8-bit scale +
8-bit zero, as HQQ stores its quantised meta-data) reproduces the published ~66 MB per
Mixtral-8x7B expert at 2 bits / group 16 and ~93 MB at 4 bits / group 64.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sim.errors import UserError


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of one MoE model. Derived byte and FLOP counts are properties (units in names)."""

    name: str
    layers: int  # MoE layers
    experts: int  # routed experts per MoE layer
    top_k: int
    hidden: int
    expert_width: int  # intermediate size of one routed expert
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    shared_experts: int = 0
    shared_expert_width: int = 0  # intermediate size of one shared expert
    dense_layers: int = 0  # leading decoder layers with a dense MLP
    dense_width: int = 0  # intermediate size of those dense MLPs
    expert_bias: bool = False  # gpt-oss experts carry biases
    bits: float = 16.0  # bits per routed-expert weight
    group_size: int = 0  # quantisation group (0: no scales)
    scale_bits: float = 16.0  # bits per group for scale + zero point
    attn_bits: float = 16.0  # bits per non-expert weight (attention, shared experts, dense MLPs)
    source: str = ""

    # ------------------------------------------------------------------ derived sizes
    @property
    def expert_params(self) -> int:
        """Parameters of one routed SwiGLU expert: 3 matrices hidden x width (+ biases)."""
        p = 3 * self.hidden * self.expert_width
        return p + (2 * self.expert_width + self.hidden if self.expert_bias else 0)

    @property
    def expert_bytes(self) -> float:
        """Bytes moved to load one expert at `bits`, with quantisation scales."""
        scales = self.expert_params * self.scale_bits / self.group_size if self.group_size else 0.0
        return (self.expert_params * self.bits + scales) / 8

    @property
    def attn_params_per_layer(self) -> int:
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        router = self.hidden * self.experts
        return q + kv + o + router + 2 * self.hidden  # + two norms

    @property
    def shared_params_per_layer(self) -> int:
        return 3 * self.hidden * self.shared_expert_width * self.shared_experts

    @property
    def non_expert_bytes_per_layer(self) -> float:
        """Bytes read per token by a MoE layer's non-routed work (attention, router, shared experts)."""
        return (self.attn_params_per_layer + self.shared_params_per_layer) * self.attn_bits / 8

    @property
    def non_expert_bytes(self) -> float:
        """Resident non-expert weights: all layers' attention/shared/dense MLPs + embeddings + head."""
        dense = self.dense_layers * (self.attn_params_per_layer + 3 * self.hidden * self.dense_width)
        embed = 2 * self.vocab * self.hidden
        return self.layers * self.non_expert_bytes_per_layer + (dense + embed) * self.attn_bits / 8

    @property
    def expert_flops_per_token(self) -> float:
        return 2.0 * self.expert_params

    @property
    def non_expert_flops_per_token_per_layer(self) -> float:
        return 2.0 * (self.attn_params_per_layer + self.shared_params_per_layer)

    def kv_bytes_per_token_per_layer(self, kv_bits: float = 16.0) -> float:
        return 2 * self.kv_heads * self.head_dim * kv_bits / 8

    def with_overrides(self, **kw: object) -> ModelPreset:
        return dataclasses.replace(self, **kw)


def _mk(**kw: object) -> ModelPreset:
    return ModelPreset(**kw)  # type: ignore[arg-type]


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        _mk(name="mixtral-8x7b", layers=32, experts=8, top_k=2, hidden=4096, expert_width=14336, heads=32,
            kv_heads=8, head_dim=128, vocab=32000, bits=2, group_size=16, attn_bits=4,
            source="Mixtral-8x7B config.json; 2-bit HQQ experts (group 16), 4-bit attention as in AdapMoE"),
        _mk(name="mixtral-8x22b", layers=56, experts=8, top_k=2, hidden=6144, expert_width=16384, heads=48,
            kv_heads=8, head_dim=128, vocab=32768, source="Mixtral-8x22B config.json"),
        _mk(name="qwen1.5-moe-a2.7b", layers=24, experts=60, top_k=4, hidden=2048, expert_width=1408, heads=16,
            kv_heads=16, head_dim=128, vocab=151936, shared_experts=1, shared_expert_width=5632,
            source="Qwen1.5-MoE-A2.7B config.json"),
        _mk(name="qwen3-30b-a3b", layers=48, experts=128, top_k=8, hidden=2048, expert_width=768, heads=32,
            kv_heads=4, head_dim=128, vocab=151936, source="Qwen3-30B-A3B config.json"),
        _mk(name="qwen3-235b-a22b", layers=94, experts=128, top_k=8, hidden=4096, expert_width=1536, heads=64,
            kv_heads=4, head_dim=128, vocab=151936, bits=16, attn_bits=16,
            source="Qwen3-235B-A22B config.json (num_hidden_layers 94, num_experts 128, num_experts_per_tok 8, "
                   "hidden_size 4096, moe_intermediate_size 1536, 64 / 4 attention / KV heads, head_dim 128, "
                   "vocab_size 151936, bfloat16); model card: 235B total, 22B activated"),
        _mk(name="olmoe-1b-7b", layers=16, experts=64, top_k=8, hidden=2048, expert_width=1024, heads=16,
            kv_heads=16, head_dim=128, vocab=50304, source="OLMoE-1B-7B-0924 config.json"),
        _mk(name="deepseek-v2-lite", layers=26, experts=64, top_k=6, hidden=2048, expert_width=1408, heads=16,
            kv_heads=16, head_dim=128, vocab=102400, shared_experts=2, shared_expert_width=1408,
            dense_layers=1, dense_width=10944, source="DeepSeek-V2-Lite config.json (MLA approximated as MHA)"),
        _mk(name="deepseek-v3", layers=58, experts=256, top_k=8, hidden=7168, expert_width=2048, heads=128,
            kv_heads=128, head_dim=128, vocab=129280, shared_experts=1, shared_expert_width=2048,
            dense_layers=3, dense_width=18432, bits=8, attn_bits=8,
            source="DeepSeek-V3 config.json; FP8 weights (MLA approximated as MHA)"),
        _mk(name="phi-3.5-moe", layers=32, experts=16, top_k=2, hidden=4096, expert_width=6400, heads=32,
            kv_heads=8, head_dim=128, vocab=32064, source="Phi-3.5-MoE-instruct config.json"),
        _mk(name="gpt-oss-20b", layers=24, experts=32, top_k=4, hidden=2880, expert_width=2880, heads=64,
            kv_heads=8, head_dim=64, vocab=201088, expert_bias=True, bits=4.25, attn_bits=16,
            source="gpt-oss-20b config.json; MXFP4 experts (4 bits + one 8-bit scale per 32 = 4.25 bits)"),
        _mk(name="mixtral-mini", layers=32, experts=8, top_k=2, hidden=512, expert_width=768, heads=8,
            kv_heads=2, head_dim=64, vocab=32000, bits=32, attn_bits=32,
            source="ours: Mixtral-8x7B's routing shape (32 layers, 8 experts, top-2) at hidden 512, expert "
                   "width 768, float32 (4.7 MB per expert): what `confirm` replays on a small CPU machine, "
                   "where a load from disk takes milliseconds (docs/fidelity.md)"),
        _mk(name="toy-mixtral", layers=32, experts=8, top_k=2, hidden=64, expert_width=128, heads=4,
            kv_heads=2, head_dim=16, vocab=256, source="this project's toy model (models/toy-mixtral)"),
    ]
}


def load_preset(name: str, **overrides: object) -> ModelPreset:
    """The model `name` names, with field overrides (e.g. bits=4), every value checked.

    `name` is a preset, or any other `model=` source (a model YAML file, a Hugging Face config.json
    or checkpoint folder: `sim/machine/model_source.py`). UserError if it names nothing, for an
    unknown field or a bad value."""
    from sim.machine.model_source import complete, source_fields

    values, why, where = source_fields(name)
    return complete(values, why, None, dict(overrides), where, quant_key="model")


def check_trace(preset: ModelPreset, layers: int, experts: int, top_k: int) -> None:
    """Refuse a trace whose routing shape differs from the model's (UserError names both)."""
    have = (layers, experts, top_k)
    want = (preset.layers, preset.experts, preset.top_k)
    if have != want:
        same = sorted(n for n, p in PRESETS.items() if (p.layers, p.experts, p.top_k) == have)
        hint = f"presets of this shape: {', '.join(same)}" if same else "no preset has this shape"
        raise UserError(
            f"trace shape (layers, experts, top_k) = {have} does not match model preset "
            f"{preset.name!r} {want}; give model= of the trace's shape ({hint}), or set the fields "
            f"with model.layers=, model.experts=, model.top_k= (docs/models.md)"
        )
