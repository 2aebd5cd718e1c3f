"""Held-out evaluation: bits per byte, and how evenly the router spreads tokens over experts.

A window of n bytes is scored on its last n-1 bytes, each predicted from the bytes before it in the
same window. Tokens are bytes, so cross-entropy / ln 2 is bits per byte directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def eval_windows(stream: bytes, seq_len: int, count: int | None = None) -> np.ndarray:
    """Non-overlapping windows `[count, seq_len]` (uint8) of `stream`.

    `count=None`: every whole window, in order. Otherwise `count` windows spread evenly over the
    stream (deterministic), so a quick evaluation still sees every part of the held-out text.
    """
    whole = len(stream) // seq_len
    if whole < 1:
        raise ValueError(f"stream of {len(stream)} bytes is shorter than one window of {seq_len}")
    data = np.frombuffer(stream, dtype=np.uint8)[: whole * seq_len].reshape(whole, seq_len)
    if count is None or count >= whole:
        return data
    pick = np.linspace(0, whole - 1, count).round().astype(np.int64)
    return data[pick]


@dataclass
class EvalResult:
    bits_per_byte: float
    bytes_scored: int
    usage: np.ndarray | None = None  # [L, E] share of each layer's top-k assignments per expert

    def usage_range(self) -> tuple[float, float]:
        """(min, max) expert usage share over all layers and experts (uniform = 1/E)."""
        assert self.usage is not None, "evaluate(..., usage=True) was not requested"
        return float(self.usage.min()), float(self.usage.max())


def evaluate(model: Any, windows: np.ndarray, batch: int = 16, usage: bool = False) -> EvalResult:
    """Bits per byte of `model` on `windows` [N, T]; with `usage`, also per-layer expert usage."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total_nats, scored = 0.0, 0
    top_k = model.config.num_experts_per_tok
    counts = None
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            ids = torch.from_numpy(windows[start : start + batch].astype(np.int64))  # [B, T]
            out = model(input_ids=ids, output_router_logits=usage, use_cache=False)
            logits = out.logits[:, :-1].float()  # [B, T-1, V]
            target = ids[:, 1:]  # [B, T-1]
            total_nats += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
            ).item()
            scored += target.numel()
            if usage:
                layer_counts = []
                for router_logits in out.router_logits:  # per layer [B*T, E]
                    chosen = router_logits.topk(top_k, dim=-1).indices.reshape(-1)
                    layer_counts.append(torch.bincount(chosen, minlength=router_logits.size(-1)))
                batch_counts = torch.stack(layer_counts).double().numpy()  # [L, E]
                counts = batch_counts if counts is None else counts + batch_counts
    model.train(was_training)
    shares = None if counts is None else counts / counts.sum(axis=1, keepdims=True)
    return EvalResult(total_nats / scored / math.log(2), scored, shares)
