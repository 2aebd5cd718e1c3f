"""The profile trace a learned policy is fitted on (its `fit=DIR` knob), and the rule that it
shares no row with the trace being replayed.

`fit_trace(path, ctx, who)` reads the trace folder `path` (a bare name is looked up in `traces/`,
as `trace=`), checks that it has the replayed model's shape (layers, experts, top-k), and refuses
it when the two could share a row: the same trace; one the unsplit root of the other (`sim.trace.split`
records the root's checksum through nested splits); or two parts of the same root whose (sequence,
position) rows overlap. Fitting on one part and testing on another: `python -m sim split trace=DIR
out=FIT,TEST`, then `trace=TEST cache.fit=FIT`. Every error is one `UserError` line naming the
policy's knob.
"""

from __future__ import annotations

import numpy as np

from policies.base import Context
from sim.errors import UserError
from sim.trace.format import Trace


def _root(trace: Trace) -> tuple[str, str]:
    """(its own checksum, the checksum of the unsplit trace it is a part of, or its own)."""
    own = trace.checksum()
    return own, (trace.source.get("split") or {}).get("root", own)


def _rows(trace: Trace) -> np.ndarray:
    """[T] int64: each row as one (sequence, position) number."""
    return (trace.seq.astype(np.int64) << 32) | trace.pos.astype(np.int64)


def fit_trace(path: str, ctx: Context, who: str) -> Trace:
    """The validated profile trace at `path` for policy knob `who` (e.g. "cache.fit"); see the module."""
    from sim.runner import load_trace

    if not path:
        raise UserError(f"{who} needs a profile trace folder to fit on (FIT_DIR: python -m sim split "
                        f"trace=DIR out=FIT_DIR,TEST_DIR makes one from a trace)")
    try:
        fit = load_trace(path)
    except UserError as err:
        raise UserError(f"{who}={path}: {err}") from None
    run, m = ctx.trace, ctx.trace.model
    if (fit.model.layers, fit.model.experts, fit.model.top_k) != (m.layers, m.experts, m.top_k):
        raise UserError(f"{who}={path}: its model has {fit.model.layers} layers x {fit.model.experts} experts, "
                        f"top-{fit.model.top_k}; the replayed trace {m.layers} x {m.experts}, top-{m.top_k}")
    (fit_sum, fit_root), (run_sum, run_root) = _root(fit), _root(run)
    shared = (fit_sum == run_sum or fit_root == run_sum or run_root == fit_sum
              or (fit_root == run_root and np.isin(_rows(run), _rows(fit)).any()))
    if shared:
        raise UserError(f"{who}={path} shares rows with the replayed trace (it is the trace, contains it, is part of "
                        f"it or overlaps it): a learned policy is never evaluated on what it was fitted on; split the "
                        f"trace: python -m sim split trace=DIR out=FIT,TEST")
    return fit
