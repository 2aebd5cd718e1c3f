"""Synthetic traces for tests, examples and what-ifs (seeded, no model needed)."""

from __future__ import annotations

import numpy as np

from sim.trace.format import ModelInfo, Trace


def softmax_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mixtral's rule: softmax over all experts, top-k, renormalise. logits [..., E] -> ids, w [..., k]."""
    ids = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(logits, ids, axis=-1)
    w = np.exp(top - top.max(axis=-1, keepdims=True))
    return ids, w / w.sum(axis=-1, keepdims=True)


def random_trace(
    rng: np.random.Generator,
    *,
    tokens: int = 64,
    layers: int = 4,
    experts: int = 8,
    top_k: int = 2,
    prefill: int = 0,
    sequences: int = 1,
    locality: float = 0.0,
    pregate_depth: int = 2,
    pregate_noise: float = 0.5,
    name: str = "synthetic",
) -> Trace:
    """A Mixtral-style trace: random router logits, softmax-then-top-k, renormalised weights.

    `locality` in [0, 1) mixes the previous token's logits into the current one (temporal reuse);
    `pregate_d` is the true logits of layer l+d plus Gaussian noise of std `pregate_noise`.
    Each of `sequences` requests has `prefill` prompt tokens then `tokens` decode tokens.
    """
    per_seq = prefill + tokens
    T = per_seq * sequences
    logits = rng.standard_normal((T, layers, experts)).astype(np.float32)  # [T, L, E]
    for t in range(1, T):
        logits[t] = locality * logits[t - 1] + (1 - locality) * logits[t]
    ids, w = softmax_topk(logits, top_k)
    pregate = {}
    for d in range(1, pregate_depth + 1):
        p = np.zeros_like(logits)
        p[:, : layers - d] = logits[:, d:] + pregate_noise * rng.standard_normal(logits[:, d:].shape)
        pregate[d] = p.astype(np.float32)
    seq = np.repeat(np.arange(sequences, dtype=np.int32), per_seq)
    pos = np.tile(np.arange(per_seq, dtype=np.int32), sequences)
    model = ModelInfo(name=name, layers=layers, experts=experts, top_k=top_k, moe_layer_ids=tuple(range(layers)))
    return Trace(
        model=model,
        seq=seq,
        pos=pos,
        is_decode=pos >= prefill,
        experts=ids.astype(np.int16),
        weights=w.astype(np.float32),
        logits=logits,
        pregate=pregate,
        fisher=rng.exponential(1.0, (T, layers)).astype(np.float32),
        sensitivity=np.geomspace(10.0, 0.1, layers),
        sensitivity_info={"definition": "synthetic"},
        source={"tool": "sim.trace.synthetic.random_trace"},
    )
