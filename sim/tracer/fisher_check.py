"""Validate the Fisher estimates by really dropping experts (`python -m sim fisher-check`).

For sampled (sequence, position, MoE layer) triples of a traced text, the lowest-ranked routed
expert e_k is really dropped at that one position and layer: the router's output is edited so
that e_k gets weight 0 and e_1 gets w_1 + w_k (top-2 renormalised: e_1 runs alone with weight 1),
the block computes its output from that routing, and the forward pass continues (later layers
may route differently: that is part of the true effect). The measured change is the change of
the sequence's summed next-token NLL (nats) against the same sequence unperturbed in the same
batch (each perturbation is one batch row of copies of the sequence; row 0 is unperturbed).

Estimates compared with it (w = w_k, see `sim.tracer.core`):
    second order  1/2 * w^2 * fisher            (AdapMoE's model: dL ~ 1/2 * w2^2 * S_l on average)
    first order   w * g.(E_1 - E_k)             (does not vanish per token: the model is not at a
                                                 minimum of each token's loss; it averages out)
    both          the sum of the two
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats

from sim.tracer.capture import Capture
from sim.tracer.core import BatchResult, sequence_nll
from sim.tracer.loader import Loaded


@dataclass
class Flat:
    """All traced sequences of a run, stacked: N sequences of S positions, L layers."""

    tokens: np.ndarray  # [N, S]
    targets: np.ndarray  # [N, S]
    experts: np.ndarray  # [N, S, L, k]
    weights: np.ndarray  # [N, S, L, k]
    fisher: np.ndarray  # [N, S, L]
    first_order: np.ndarray  # [N, S, L]

    @classmethod
    def of(cls, results: list[BatchResult]) -> Flat:
        cat = lambda name: np.concatenate([getattr(r, name) for r in results], axis=0)  # noqa: E731
        return cls(*(cat(n) for n in ("tokens", "targets", "experts", "weights", "fisher", "first_order")))


def sample_pairs(shape: tuple[int, int, int], samples: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 3] (seq, pos, layer), stratified by layer: layer l gets samples // L pairs (+1 for the
    first samples % L layers), positions uniform without replacement within the layer."""
    N, S, L = shape
    rows = []
    for layer in range(L):
        n = min(samples // L + (1 if layer < samples % L else 0), N * S)
        flat = rng.choice(N * S, size=n, replace=False)
        rows += [(int(f // S), int(f % S), layer) for f in sorted(flat)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


@torch.no_grad()
def measure(loaded: Loaded, flat: Flat, pairs: np.ndarray, *, batch: int = 16, step=None) -> np.ndarray:
    """True change of the summed NLL for each pair (see the module docstring)."""
    dev = loaded.input_device
    S = flat.tokens.shape[1]
    out = np.zeros(len(pairs))
    for s in np.unique(pairs[:, 0]):
        idx = np.nonzero(pairs[:, 0] == s)[0]
        for start in range(0, len(idx), batch):
            chunk = idx[start : start + batch]
            B = len(chunk) + 1  # row 0 = unperturbed baseline
            seq = torch.as_tensor(flat.tokens[s], device=dev).expand(B, S)
            tgt = torch.as_tensor(flat.targets[s], device=dev).expand(B, S)
            with Capture(loaded.family, loaded.layers) as cap:
                for row, p in enumerate(chunk, start=1):
                    _, t, layer = (int(v) for v in pairs[p])
                    e1, ek = (int(v) for v in flat.experts[s, t, layer, [0, -1]])
                    cap.drops.setdefault(layer, []).append((row * S + t, ek, e1))
                logits = loaded.model(input_ids=seq, use_cache=False).logits
            nll = sequence_nll(logits, tgt.to(logits.device)).double().sum(-1).cpu().numpy()  # [B]
            out[chunk] = nll[1:] - nll[0]
            if step:
                step(len(chunk))
    return out


def _corr(x: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    def clean(v: float) -> float | None:
        return None if not np.isfinite(v) else float(v)

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": None, "spearman": None}
    return {"pearson": clean(stats.pearsonr(x, y)[0]), "spearman": clean(stats.spearmanr(x, y)[0])}


def analyse(flat: Flat, pairs: np.ndarray, measured: np.ndarray) -> dict[str, Any]:
    """The figures of the report (JSON-ready)."""
    L = flat.fisher.shape[2]
    s, t, lay = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    w = flat.weights[s, t, lay, -1].astype(np.float64)  # w_k of each pair
    second = 0.5 * w**2 * flat.fisher[s, t, lay]
    first = w * flat.first_order[s, t, lay]
    S_l = flat.fisher.mean(axis=(0, 1))  # [L]
    w2_sq = (flat.weights[..., -1].astype(np.float64) ** 2).mean(axis=(0, 1))  # [L] mean w_k^2
    predicted = 0.5 * w2_sq * S_l
    layers = []
    for layer in range(L):
        m = lay == layer
        mean = lambda a, m=m: float(a[m].mean()) if m.any() else None  # noqa: E731
        layers.append(
            {
                "layer": layer,
                "S_l": float(S_l[layer]),
                "mean_w2_sq": float(w2_sq[layer]),
                "predicted_mean": float(predicted[layer]),
                "measured_mean": mean(measured),
                "measured_abs_mean": mean(np.abs(measured)),
                "second_order_mean": mean(second),
                "first_order_mean": mean(first),
                "pairs": int(m.sum()),
            }
        )
    have = np.array([row["pairs"] > 0 for row in layers])
    col = lambda key: np.array([row[key] if row[key] is not None else 0.0 for row in layers])[have]  # noqa: E731
    taylor = col("first_order_mean") + col("second_order_mean")
    return {
        "layers": layers,
        "per_layer": {
            "layers": int(have.sum()),
            # AdapMoE's model, signed: 1/2 mean(w2^2) S_l vs the mean measured change
            **_corr(predicted[have], col("measured_mean")),
            # the same prediction vs the mean SIZE of the change, mean |dL|
            "abs": _corr(predicted[have], col("measured_abs_mean")),
            # the Taylor expansion on the same pairs (first + second order) vs the mean measured change
            "taylor": _corr(taylor, col("measured_mean")),
        },
        "per_pair": {
            "pairs": int(len(pairs)),
            "second_order": _corr(second, measured),
            "first_order": _corr(first, measured),
            "both": _corr(first + second, measured),
            # the second-order estimate as a predictor of the size of the change |dL|
            "second_order_abs": _corr(second, np.abs(measured)),
            "means": {
                "measured": float(measured.mean()),
                "second_order": float(second.mean()),
                "first_order": float(first.mean()),
                "both": float((first + second).mean()),
                "measured_abs": float(np.abs(measured).mean()),
            },
        },
        "pairs": [
            {
                "seq": int(a),
                "pos": int(b),
                "layer": int(c),
                "w2": float(wi),
                "fisher": float(flat.fisher[a, b, c]),
                "first_order_term": float(flat.first_order[a, b, c]),
                "second_order": float(se),
                "first_order": float(fo),
                "measured": float(me),
            }
            for (a, b, c), wi, se, fo, me in zip(pairs, w, second, first, measured, strict=True)
        ],
    }


def figure_html(report: dict[str, Any], title: str) -> str:
    """A self-contained plotly page: per layer (size, then signed mean) and the per-pair scatter."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = [r for r in report["layers"] if r["pairs"]]
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=(
            "per layer: size of the change (log)",
            "per layer: mean signed change",
            "per (token, layer): measured vs estimated",
        ),
    )
    xs = [r["layer"] for r in rows]
    line = lambda y, name, col: fig.add_trace(  # noqa: E731
        go.Scatter(x=xs, y=y, mode="lines+markers", name=name), row=1, col=col
    )
    line([r["predicted_mean"] for r in rows], "1/2 mean(w2^2) S_l", 1)
    line([r["measured_abs_mean"] for r in rows], "mean |measured dL|", 1)
    line([r["measured_mean"] for r in rows], "mean measured dL", 2)
    line([r["first_order_mean"] + r["second_order_mean"] for r in rows], "mean (first + second order)", 2)
    pairs = report["pairs"]
    meas = [p["measured"] for p in pairs]
    text = [f"seq {p['seq']} pos {p['pos']} layer {p['layer']}" for p in pairs]
    for key, name in (("second_order", "1/2 w2^2 fisher"), ("first_order", "w2 g.(E1-E2)")):
        fig.add_trace(
            go.Scatter(
                x=[p[key] for p in pairs],
                y=meas,
                mode="markers",
                name=name,
                text=text,
                marker={"size": 4, "opacity": 0.5},
            ),
            row=1,
            col=3,
        )
    lo, hi = min(meas + [0.0]), max(meas + [0.0])
    fig.add_trace(
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line={"dash": "dot", "color": "grey"}),
        row=1,
        col=3,
    )
    fig.update_yaxes(type="log", title_text="nats (summed NLL)", row=1, col=1)
    fig.update_yaxes(title_text="nats", row=1, col=2)
    for col in (1, 2):
        fig.update_xaxes(title_text="MoE layer", row=1, col=col)
    fig.update_xaxes(title_text="estimate (nats)", row=1, col=3)
    fig.update_yaxes(title_text="measured dL (nats)", row=1, col=3)
    fig.update_layout(title=title, width=1500, height=520)
    return fig.to_html(include_plotlyjs=True, full_html=True)
