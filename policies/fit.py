"""The profile trace a learned policy is fitted on (its `fit=DIR` knob), and the rule that it is
never the trace being replayed.

`fit_trace(path, ctx, who)` reads the trace folder `path` (a bare name is looked up in `traces/`,
as `trace=`), checks that it has the replayed model's shape (layers, experts, top-k), and refuses
it when it is the replayed trace itself, contains it or is part of it: same checksum, or one is a
part of a split (`sim.trace.split`) of the other. Fitting on one part
and testing on another: `python -m sim split trace=DIR out=FIT,TEST`, then `trace=TEST
cache.fit=FIT`. Errors are `UserError`s naming the policy's knob.
"""

from __future__ import annotations

from policies.base import Context
from sim.errors import UserError
from sim.trace.format import Trace


def fit_trace(path: str, ctx: Context, who: str) -> Trace:
    """The validated profile trace at `path` for policy knob `who` (e.g. "cache.fit"); see the module."""
    from sim.runner import load_trace

    if not path:
        raise UserError(f"{who} needs a profile trace folder to fit on (FIT_DIR: python -m sim split "
                        f"trace=DIR out=FIT_DIR,TEST_DIR makes one from a trace)")
    fit = load_trace(path)
    run, m = ctx.trace, ctx.trace.model
    if (fit.model.layers, fit.model.experts, fit.model.top_k) != (m.layers, m.experts, m.top_k):
        raise UserError(f"{who}={path}: its model has {fit.model.layers} layers x {fit.model.experts} experts, "
                        f"top-{fit.model.top_k}; the replayed trace {m.layers} x {m.experts}, top-{m.top_k}")
    fit_sum, run_sum = fit.checksum(), run.checksum()
    run_of = (run.source.get("split") or {}).get("of")
    fit_of = (fit.source.get("split") or {}).get("of")
    if fit_sum == run_sum or fit_sum == run_of or fit_of == run_sum:
        raise UserError(f"{who}={path} is the replayed trace, contains it or is part of it: a learned policy is never evaluated "
                        f"on the trace it was fitted on; split it: python -m sim split trace=DIR out=FIT,TEST")
    return fit
