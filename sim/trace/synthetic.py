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


def routing_trace(rng: np.random.Generator, *, tokens: int, layers: int, experts: int, top_k: int,
                  locality: float = 0.0, name: str = "synthetic") -> Trace:
    """A routing-only trace of one sequence at any scale: experts and weights, no logits, pre-gating
    or Fisher arrays (`python -m sim bench shape=...`: a stateless top-k gating and no prefetch
    need nothing else).

    The routing follows `random_trace`'s rule (standard-normal logits mixed with the previous
    token's by `locality`, softmax-then-top-k) but is drawn one token at a time in float32, so it
    holds [layers, experts] logits at once instead of [tokens, layers, experts]: a 50,000-token
    DeepSeek-V3 shape takes 2.9 MB per 1,000 tokens, not 178 MB."""
    ids = np.empty((tokens, layers, top_k), np.int16)  # [T, L, k]
    w = np.empty((tokens, layers, top_k), np.float32)
    prev = None
    for t in range(tokens):
        x = rng.standard_normal((layers, experts), dtype=np.float32)  # [L, E]
        if prev is not None:
            x = locality * prev + (1 - locality) * x
        prev = x
        top = np.argpartition(-x, top_k - 1, axis=-1)[:, :top_k]  # [L, k], unordered
        order = np.argsort(-np.take_along_axis(x, top, -1), axis=-1, kind="stable")
        top = np.take_along_axis(top, order, -1)
        v = np.take_along_axis(x, top, -1)
        e = np.exp(v - v[:, :1])
        ids[t], w[t] = top, e / e.sum(-1, keepdims=True)
    model = ModelInfo(name=name, layers=layers, experts=experts, top_k=top_k, moe_layer_ids=tuple(range(layers)))
    return Trace(model=model, seq=np.zeros(tokens, np.int32), pos=np.arange(tokens, dtype=np.int32),
                 is_decode=np.ones(tokens, bool), experts=ids, weights=w,
                 source={"tool": "sim.trace.synthetic.routing_trace"})
