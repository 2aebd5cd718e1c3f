"""`python -m sim split trace=DIR out=FIT_DIR,TEST_DIR [fraction=0.5] [by=position|sequence]`

Writes two trace folders: the part a learned policy is fitted on (`policies.fit`, a policy's
`fit=FIT_DIR` knob) and the part it is evaluated on (`trace=TEST_DIR`). `by=position` splits every
sequence in time (its first `fraction` of tokens fit), `by=sequence` gives whole sequences to each
part (`sim.trace.split`). A learned policy refuses to run on the trace it was fitted on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from sim import atomic
from sim.args import parse_args
from sim.errors import UserError
from sim.runner import resolve_trace_path
from sim.trace.format import fill_trace, read_trace
from sim.trace.split import SPLITS, split_trace


@dataclass
class SplitArgs:
    trace: str = ""  # the trace folder to split
    out: str = ""  # FIT_DIR,TEST_DIR: the two folders to create
    fraction: float = 0.5  # share of each sequence's tokens (by=position) or of the sequences (by=sequence) that fit
    by: str = "position"  # position | sequence
    overwrite: bool = False  # replace existing trace folders


def main(argv: list[str]) -> int:
    args = parse_args(SplitArgs, argv)
    if not args.trace or not args.out:
        raise UserError("split needs trace=DIR out=FIT_DIR,TEST_DIR")
    outs = [Path(p.strip()) for p in args.out.split(",")]
    if len(outs) != 2 or not all(str(p) for p in outs) or outs[0].resolve() == outs[1].resolve():
        raise UserError(f"split out= names two different folders, FIT_DIR,TEST_DIR; got {args.out!r}")
    if args.by not in SPLITS:
        raise UserError(f"split by must be one of {', '.join(SPLITS)}, got {args.by!r}")
    src = resolve_trace_path(args.trace)
    with contextlib.ExitStack() as claims:  # both claimed before any work; neither written unless both are
        tmps = [claims.enter_context(atomic.new_dir(p, overwrite=args.overwrite,
                                                    replaces=("meta.yaml", "routing.parquet")))
                for p in outs]
        parts = split_trace(read_trace(src), args.fraction, args.by)
        for part, tmp in zip(parts, tmps, strict=True):
            fill_trace(part, tmp)
    for part, p in zip(parts, outs, strict=True):
        print(f"{part.source['split']['part']}: {part.num_tokens} tokens, "
              f"{len(set(part.seq.tolist()))} sequence(s) -> {p}")
    return 0
