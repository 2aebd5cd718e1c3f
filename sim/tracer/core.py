"""The tracing computation for one batch of equal-length prompts.

1. Prefill the prompts [B, P] (one forward, KV cache on), then greedy-decode `decode_tokens`
   steps (argmax, lowest id on ties), each feeding the previous argmax. Every fed position is
   recorded: router logits, top-k ids and weights exactly as the router returned them (ids
   re-sorted by weight), and the pre-gating logits of the next `pregate_depth` MoE layers.
   The argmax after the last fed token becomes the target of the last position.
2. Fisher pass (optional): weights frozen, one teacher-forced forward over the S = P + D fed
   tokens with zero "taps" added to every MoE block output; loss = summed next-token NLL (nats)
   of all sequences of the batch; one backward gives g = dLoss/d(MoE output) at every position.
   With e_1 / e_k the top- / lowest-ranked routed expert of the row and x the MoE input:
       fisher      = sum_i g_i^2 * (E_1(x) - E_k(x))_i^2     (diagonal empirical Fisher)
       first_order = sum_i g_i   * (E_1(x) - E_k(x))_i
   Moving e_k's weight w_k onto e_1 (for top-2 renormalised: run e_1 alone with weight 1) moves
   the block output by w_k (E_1 - E_k), so dL ~ w_k * first_order + 1/2 * w_k^2 * fisher.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from sim.tracer.capture import Capture
from sim.tracer.loader import Loaded


@dataclass
class BatchResult:
    """Arrays of one batch; S = prompt_tokens + decode_tokens positions per sequence."""

    tokens: np.ndarray  # [B, S] int64 token fed at each position
    targets: np.ndarray  # [B, S] int64 next token (greedy argmax after the last position)
    logits: np.ndarray  # [B, S, L, E] float32 router logits
    experts: np.ndarray  # [B, S, L, k] int64 ids, rank order (weight descending)
    weights: np.ndarray  # [B, S, L, k] float32 their weights as routed
    pregate: dict[int, np.ndarray]  # d -> [B, S, L, E] float32
    fisher: np.ndarray | None = None  # [B, S, L] float64
    first_order: np.ndarray | None = None  # [B, S, L] float64
    nll: np.ndarray | None = None  # [B] float64 summed next-token NLL per sequence (nats)


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` (old name deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(
    loaded: Loaded, prompt_ids: np.ndarray, decode_tokens: int, pregate_depth: int, step=None
) -> BatchResult:
    """Prefill + greedy decode with the KV cache, recording every fed position."""
    model, layers = loaded.model, loaded.layers
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=loaded.input_device)  # [B, P]
    kw = cache_kwarg(model)
    chunks: list[tuple] = []
    fed = [ids]
    with Capture(loaded.family, layers, record=True) as cap:
        out = model(input_ids=ids, use_cache=True)
        chunks.append(_collect(cap, pregate_depth))
        nxt = out.logits[:, -1].argmax(-1)  # [B]
        if step:
            step()
        for _ in range(decode_tokens):
            cache = out["cache"] if "cache" in out else out["past_key_values"]
            nxt = nxt.to(loaded.input_device)
            fed.append(nxt[:, None])
            out = model(input_ids=nxt[:, None], use_cache=True, **{kw: cache})
            chunks.append(_collect(cap, pregate_depth))
            nxt = out.logits[:, -1].argmax(-1)
            if step:
                step()
    tokens = torch.cat(fed, dim=1).cpu().numpy()
    targets = np.concatenate([tokens[:, 1:], nxt[:, None].cpu().numpy()], axis=1)
    cat = lambda j: np.concatenate([c[j] for c in chunks], axis=1)  # noqa: E731  along S
    pre = {d: np.concatenate([c[3][d] for c in chunks], axis=1) for d in range(1, pregate_depth + 1)}
    return BatchResult(tokens, targets, cat(0), cat(2), cat(1), pre)


def _collect(cap: Capture, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    L = len(cap.layers)
    logits = np.stack([cap.routes[i][0].cpu().numpy() for i in range(L)], axis=2)  # [B, s, L, E]
    weights = np.stack([cap.routes[i][1].cpu().numpy() for i in range(L)], axis=2)  # [B, s, L, k]
    ids = np.stack([cap.routes[i][2].cpu().numpy() for i in range(L)], axis=2)  # [B, s, L, k]
    pre = {d: t.numpy() for d, t in cap.pregate(depth).items()}
    return logits, weights, ids, pre


def sequence_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position next-token NLL in nats: logits [B, S, V], targets [B, S] -> [B, S] float32+."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = []
    for b in range(logits.shape[0]):  # one row at a time: a float copy of [S, V] at most
        logp = torch.log_softmax(logits[b].to(dtype), dim=-1)
        rows.append(-logp.gather(-1, targets[b][:, None])[:, 0])
    return torch.stack(rows)


def fisher_pass(loaded: Loaded, res: BatchResult) -> None:
    """Fill `res.fisher`, `res.first_order` and `res.nll` (see the module docstring)."""
    model, layers, family = loaded.model, loaded.layers, loaded.family
    dev = loaded.input_device
    seq = torch.as_tensor(res.tokens, dtype=torch.long, device=dev)
    tgt = torch.as_tensor(res.targets, dtype=torch.long, device=dev)
    B, S = seq.shape
    with torch.enable_grad(), Capture(family, layers, taps=True) as cap:
        out = model(input_ids=seq, use_cache=False)
        nll = sequence_nll(out.logits, tgt.to(out.logits.device))  # [B, S]
        loss = nll.sum()
        grads = torch.autograd.grad(loss, [cap.taps[i] for i in range(len(layers))])
        inputs = dict(cap.inputs)
    fisher = np.zeros((B, S, len(layers)))
    first = np.zeros((B, S, len(layers)))
    with torch.no_grad():
        for layer, g in zip(layers, grads, strict=True):
            i = layer.index
            x = inputs[i].reshape(B * S, -1)
            e1 = torch.as_tensor(res.experts[:, :, i, 0].reshape(-1))
            ek = torch.as_tensor(res.experts[:, :, i, -1].reshape(-1))
            diff = (
                family.expert_output(layer, x, e1) - family.expert_output(layer, x, ek)
            ).double()  # [N, H]
            gd = g.reshape(B * S, -1).double().to(diff.device) * diff
            fisher[:, :, i] = (gd * gd).sum(-1).reshape(B, S).cpu().numpy()
            first[:, :, i] = gd.sum(-1).reshape(B, S).cpu().numpy()
    res.fisher, res.first_order = fisher, first
    res.nll = nll.detach().double().sum(-1).cpu().numpy()
