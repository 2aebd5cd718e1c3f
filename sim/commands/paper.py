"""`python -m sim paper trace=DIR [hw=rtx4090.yaml] [slots=64] [T=0.005] [sensitivity=published] [out=FILE.md]`.

Before any arm runs, the arguments are checked (numbers in range, `sensitivity` and `fit` known)
and the baseline arm's configuration is built without simulating it, so that a bad trace,
profile, model or cache size is one line and exit 2, not an error after every arm; `out=` (and
the `.json` beside it) is claimed then too.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from sim.args import parse_args
from sim.errors import UserError

FITS = ("trace", "published")


def check(a) -> None:
    """Refuse what would fail every arm (or write nothing): UserError, before the work."""
    from sim.config import parse_run_config
    from sim.paper import arms
    from sim.runner import build_engine

    if a.fit not in FITS:
        raise UserError(f"fit must be one of {', '.join(FITS)}, got {a.fit!r}")
    if a.sensitivity not in ("published", "trace") and not Path(a.sensitivity).is_file():
        raise UserError(f"sensitivity must be published, trace or a file; {a.sensitivity!r} is none of them")
    _label, _ref, args = arms(a)[0]  # the baseline: every other arm's speedup is relative to it
    base = [f"trace={a.trace}", f"hw={a.hw}", f"model={a.model}", f"cache.slots={a.slots}", f"seed={a.seed}"]
    build_engine(parse_run_config(base + args))


def main(argv: list[str]) -> int:
    from sim import atomic
    from sim.paper import PaperArgs, gaps, markdown, run_paper

    a = parse_args(PaperArgs, argv)
    check(a)
    with contextlib.ExitStack() as claims:
        if a.out:
            out = Path(a.out)
            for path in dict.fromkeys((out, out.with_suffix(".json"))):
                claims.enter_context(atomic.claim_file(path))
        rows = run_paper(a)
        table = markdown(rows) + "\n\n" + gaps(rows)
        title = (f"trace `{a.trace}`, hw `{a.hw}`, model `{a.model}`, {a.slots}-slot cache, T = {a.T}, "
                 f"sensitivities: {a.sensitivity}, DP fit: {a.fit}, seed {a.seed}")
        if a.out:
            atomic.write_text(out, f"{title}\n\n{table}\n")
            atomic.write_text(out.with_suffix(".json"), json.dumps(rows, indent=2))
    print(title)
    print(table)
    if any(r.get("prefetch_modelled") for r in rows):
        print("* prefetch predictions modelled (the trace has no pre-gating logits)")
    return 0
