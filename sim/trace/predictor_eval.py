"""Precision and recall of expert predictors on a test trace (the `learned` prefetch's, and baselines).

A predictor, made at layer l of decode token t, names the experts of layer l + d it expects
(at most `count`). Over every decode token of the test trace and every source layer
l = 0..L-1-d: hits = |predicted ∩ true| (true = the trace's top-k at l + d),
precision = sum(hits) / sum(|predicted|), recall = sum(hits) / sum(|true|) (micro averages; a
predictor that names nothing at a pair adds to neither's numerator nor precision's denominator).
This is the predictor alone: which of its experts the simulator prefetches (the absent ones) and
whether they arrive in time is the run's `prefetch_used` / `prefetch_late` / `prefetch_wasted`.

Predictors (`evaluate`):
- `learned`: `policies.prefetch.learned.LearnedPredictor` fitted on the fit trace, its top
  `count` at least `min_prob`;
- `pregate`: the test trace's `pregate_d` logits, top `count` (only when the trace has them);
- `previous`: the experts the previous token of the same sequence ran at l + d (at most top-k);
- `frequency`: the fit trace's most frequent experts of layer l + d (its decode tokens), top `count`.
Ties: lower expert id. Command line: `python -m sim.trace.predictor_eval fit=DIR test=DIR
[depth=1] [count=2] [min_prob=0] [l2=0.01] [features=auto] [fit_on=decode]`.
"""

from __future__ import annotations

import sys

import numpy as np

from sim.errors import UserError
from sim.trace.format import Trace


def precision_recall(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """pred [N, c], true [N, k] expert ids (-1: none) -> {precision, recall, hits, predicted, true}."""
    pred = np.asarray(pred, dtype=np.int64)
    true = np.asarray(true, dtype=np.int64)
    hit = ((pred[:, :, None] == true[:, None, :]) & (pred[:, :, None] >= 0)).any(-1)  # [N, c]
    hits, named, actual = int(hit.sum()), int((pred >= 0).sum()), int((true >= 0).sum())
    return {"precision": hits / named if named else float("nan"), "recall": hits / actual if actual else float("nan"),
            "hits": hits, "predicted": named, "true": actual}


def _pairs(test: Trace, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(decode rows, true ids [rows, L - d, k] of layer l + d) of the test trace."""
    rows = np.flatnonzero(test.is_decode)
    return rows, test.experts[rows, d:].astype(np.int64)


def evaluate(fit: Trace, test: Trace, depth: int = 1, count: int = 2, min_prob: float = 0.0, l2: float = 0.01,
             features: str = "auto", fit_on: str = "decode") -> list[dict]:
    """One row per (predictor, depth): see the module docstring."""
    from policies.prefetch.learned import LearnedPredictor, previous_rows, ranked

    if depth < 1 or count < 1:
        raise UserError("depth and count must be >= 1")
    L, E, k = test.model.layers, test.model.experts, test.model.top_k
    model = LearnedPredictor(fit, depth, l2, features, fit_on, replay=test)
    ids = test.experts.astype(np.int64)
    prev = previous_rows(test)
    out = []
    for d in range(1, depth + 1):
        rows, true = _pairs(test, d)
        flat_true = true.reshape(-1, k)
        prob = model.probabilities(test, ids, d)[rows, : L - d]  # [rows, L - d, E]
        order = ranked(prob)[..., :count]
        ok = np.take_along_axis(prob, order, -1) >= min_prob
        preds = {"learned": np.where(ok, order, -1)}
        if d in test.pregate:
            preds["pregate"] = ranked(test.pregate[d][rows, : L - d])[..., :count]
        past = np.full((rows.size, L - d, k), -1, dtype=np.int64)
        has = prev[rows] >= 0
        past[has] = ids[prev[rows][has], d:]
        preds["previous"] = past[..., :count]
        dec = fit.experts[fit.is_decode].astype(np.int64) if fit.is_decode.any() else fit.experts.astype(np.int64)
        freq = np.stack([np.bincount(dec[:, m].ravel(), minlength=E) for m in range(L)])  # [L, E]
        top = ranked(freq[d:].astype(np.float64))[:, :count]  # [L - d, count]
        preds["frequency"] = np.broadcast_to(top[None], (rows.size, L - d, top.shape[1]))
        for name, p in preds.items():
            row = {"predictor": name, "depth": d, "count": count,
                   **precision_recall(p.reshape(-1, p.shape[-1]), flat_true)}
            if name == "learned":
                row["features"] = "+".join(["routing", *model.blocks[d]])
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    from sim.runner import load_trace

    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv))
    try:
        fit, test = load_trace(args.pop("fit")), load_trace(args.pop("test"))
        kw = {"depth": int(args.pop("depth", 1)), "count": int(args.pop("count", 2)),
              "min_prob": float(args.pop("min_prob", 0.0)), "l2": float(args.pop("l2", 0.01)),
              "features": args.pop("features", "auto"), "fit_on": args.pop("fit_on", "decode")}
        if args:
            raise UserError(f"unknown argument(s) {sorted(args)}")
        rows = evaluate(fit, test, **kw)
    except (KeyError, ValueError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{r['predictor']:10s} depth={r['depth']} count={r['count']} precision={r['precision']:.3f} "
              f"recall={r['recall']:.3f} ({r['hits']}/{r['predicted']} named, {r['true']} true)"
              + (f" features={r['features']}" if "features" in r else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
