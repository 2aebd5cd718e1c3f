"""Split a trace in two (fit / test) so that a learned policy is never evaluated on what it saw.

`by=position`: each sequence's first `fraction` of its tokens (prompt first, then decode) go to
the first part, the rest to the second: the test part is the same requests, later in time (the
natural split for a trace of few, long sequences, such as the HumanEval routing of two problems).
`by=sequence`: whole sequences, the first `fraction` of them (in their order in the trace) to the
first part. Positions are kept as recorded (a test part may start at position 126). Both parts keep
the model, sensitivities and source of the trace, with `source.split` saying which part of which
trace (`of`, by checksum) each is and the unsplit trace it comes from (`root`, through nested
splits); a row is (sequence, position) of that root, so `policies.fit` can refuse a policy fitted
on any row it is run on.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sim.errors import UserError
from sim.trace.format import Trace

SPLITS = ("position", "sequence")


def split_mask(trace: Trace, fraction: float, by: str) -> np.ndarray:
    """[T] bool: True for the tokens of the first part. UserError if a part would be empty."""
    if by not in SPLITS:
        raise UserError(f"split by must be one of {', '.join(SPLITS)}, got {by!r}")
    if not 0.0 < fraction < 1.0:
        raise UserError(f"split fraction must be in (0, 1), got {fraction}")
    seqs, first_index = np.unique(trace.seq, return_index=True)
    order = seqs[np.argsort(first_index)]  # sequences in their order in the trace
    if by == "sequence":
        n_first = int(round(fraction * len(order)))
        if n_first < 1 or n_first >= len(order):
            raise UserError(f"split by=sequence fraction={fraction} of {len(order)} sequence(s) leaves a part "
                            f"empty; use by=position (each sequence's first tokens fit, its last ones test)")
        return np.isin(trace.seq, order[:n_first])
    mask = np.zeros(trace.num_tokens, dtype=bool)
    for s in order:
        idx = np.flatnonzero(trace.seq == s)
        mask[idx[: int(round(fraction * idx.size))]] = True
    if mask.all() or not mask.any():
        raise UserError(f"split by=position fraction={fraction} leaves a part empty (sequences too short)")
    return mask


def take(trace: Trace, mask: np.ndarray, label: str) -> Trace:
    """The tokens of `trace` where `mask`, as a new trace whose `source.split` names `label`."""
    pick = lambda a: None if a is None else a[mask]  # noqa: E731
    parent = trace.checksum()
    root = (trace.source.get("split") or {}).get("root", parent)  # the unsplit trace, through nested splits
    source = {**trace.source, "split": {"part": label, "of": parent, "root": root, "tokens": int(mask.sum())}}
    return dataclasses.replace(
        trace, seq=trace.seq[mask], pos=trace.pos[mask], is_decode=trace.is_decode[mask],
        experts=trace.experts[mask], weights=trace.weights[mask], logits=pick(trace.logits),
        pregate={d: a[mask] for d, a in trace.pregate.items()}, fisher=pick(trace.fisher),
        token_id=pick(trace.token_id), source=source, path=None)


def split_trace(trace: Trace, fraction: float = 0.5, by: str = "position") -> tuple[Trace, Trace]:
    """(fit part, test part) of `trace`; see the module docstring."""
    mask = split_mask(trace, fraction, by)
    return take(trace, mask, f"fit ({by}, first {fraction:g})"), take(trace, ~mask, f"test ({by}, last {1 - fraction:g})")
