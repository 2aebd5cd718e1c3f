"""Run the tracer over all prompts (in batches) and assemble a `sim.trace.format.Trace`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import sim
from sim.trace.format import ModelInfo, Trace
from sim.tracer.core import BatchResult, fisher_pass, generate
from sim.tracer.families import routing_name
from sim.tracer.loader import Loaded
from sim.tracer.prompts import Prompts

FISHER_DEFINITION = (
    "per (token, MoE layer): fisher = sum_i g_i^2 * (E_1(x) - E_k(x))_i^2, the diagonal empirical "
    "Fisher of the loss along the change of the MoE block output when the lowest-ranked routed "
    "expert e_k is dropped and its weight moved to the top-ranked e_1 (top-2: e_2 dropped, e_1 run "
    "alone with weight 1); g = dLoss/d(MoE block output) at that position, x = the MoE input, "
    "E_i = expert i's unweighted output; estimated loss change of the drop: dL ~ 1/2 * w_k^2 * fisher; "
    "S_l = mean of fisher over all traced tokens of MoE layer l"
)
LOSS_DEFINITION = (
    "summed next-token negative log-likelihood in nats over each sequence (prompt + greedy decode), "
    "teacher-forced, weights frozen; the last position's target is the model's greedy next token; "
    "dL is therefore a change of the whole sequence's total NLL"
)


def run(
    loaded: Loaded,
    prompts: Prompts,
    *,
    decode_tokens: int,
    pregate_depth: int,
    fisher: bool,
    batch: int,
    seed: int,
    progress: bool = True,
) -> list[BatchResult]:
    """Trace every prompt; batches of `batch` prompts (equal lengths, no padding)."""
    torch.manual_seed(seed)
    n = prompts.ids.shape[0]
    starts = list(range(0, n, batch))
    total = len(starts) * (1 + decode_tokens + int(fisher))
    out: list[BatchResult] = []
    with tqdm(total=total, desc="trace", unit="step", disable=None if progress else True) as bar:
        for s in starts:
            bar.set_postfix(prompts=f"{s + 1}-{min(s + batch, n)}/{n}")
            res = generate(loaded, prompts.ids[s : s + batch], decode_tokens, pregate_depth, step=bar.update)
            if fisher:
                fisher_pass(loaded, res)
                bar.update()
            out.append(res)
    return out


def model_info(loaded: Loaded) -> ModelInfo:
    fam, cfg, first = loaded.family, loaded.config, loaded.layers[0]
    shared, shared_width = fam.shared_experts(cfg)
    return ModelInfo(
        name=loaded.name,
        layers=len(loaded.layers),
        experts=fam.num_experts(first),
        top_k=fam.top_k(first),
        hidden=int(cfg.hidden_size),
        expert_width=fam.expert_width(first),
        shared_experts=shared,
        shared_expert_width=shared_width,
        dense_layers=loaded.num_decoder_layers - len(loaded.layers),
        moe_layer_ids=tuple(layer.decoder_index for layer in loaded.layers),
        dtype=loaded.dtype,
        routing=routing_name(fam, cfg),
        renormalize=fam.renormalize(cfg),
    )


def assemble(
    loaded: Loaded,
    prompts: Prompts,
    results: list[BatchResult],
    *,
    decode_tokens: int,
    pregate_depth: int,
    seed: int,
    extra_source: dict[str, Any] | None = None,
) -> Trace:
    info = model_info(loaded)
    cat = lambda name: np.concatenate([getattr(r, name) for r in results], axis=0)  # noqa: E731
    tokens = cat("tokens")  # [N, S]
    N, S = tokens.shape
    flat = lambda a: a.reshape(N * S, *a.shape[2:])  # noqa: E731  [N, S, ...] -> [T, ...]
    pos = np.tile(np.arange(S, dtype=np.int32), N)
    has_fisher = results[0].fisher is not None and info.top_k >= 2
    trace = Trace(
        model=info,
        seq=np.repeat(np.arange(N, dtype=np.int32), S),
        pos=pos,
        is_decode=pos >= prompts.ids.shape[1],
        experts=flat(cat("experts")).astype(np.int16),
        weights=flat(cat("weights")).astype(np.float32),
        logits=flat(cat("logits")).astype(np.float32),
        pregate={
            d: flat(np.concatenate([r.pregate[d] for r in results])).astype(np.float32)
            for d in range(1, pregate_depth + 1)
        },
        fisher=flat(cat("fisher")).astype(np.float32) if has_fisher else None,
        token_id=flat(tokens).astype(np.int32),
    )
    if has_fisher:
        trace.sensitivity = flat(cat("fisher")).mean(axis=0)  # [L], float64 mean over all tokens
        trace.sensitivity_info = {
            "definition": FISHER_DEFINITION,
            "loss": LOSS_DEFINITION,
            "tokens": int(N * S),
            "estimate": "dL ~ 1/2 * w_k^2 * fisher (per token); 1/2 * mean(w_k^2) * S_l (per layer)",
        }
    trace.source = {
        "tool": "moe-offload-sim trace",
        "version": sim.__version__,
        "checkpoint": loaded.name,
        "family": loaded.config.model_type,
        "routing_detail": loaded.family.routing_detail(loaded.config),
        "weights": "as the router returned them (renormalised: model.renormalize; any scaling factor applied)",
        "text": prompts.text_name,
        "text_sha256": prompts.text_sha256,
        "prompts": int(N),
        "prompt_tokens": int(prompts.ids.shape[1]),
        "decode_tokens": int(decode_tokens),
        "prompt_selection": prompts.describe(),
        "decoding": "greedy (argmax, lowest id on ties) with the KV cache",
        "pregate_depth": int(pregate_depth),
        "pregate": (
            "pregate_d[t, l] = router logits of MoE layer l+d applied to MoE layer l's input; "
            "rows with l+d >= layers have no target router and are all zeros"
        ),
        "fisher": "computed" if has_fisher else "not computed (fisher=false or top_k < 2)",
        "dtype": loaded.dtype,
        "seed": int(seed),
        **(extra_source or {}),
    }
    return trace
