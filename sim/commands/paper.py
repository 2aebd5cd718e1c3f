"""`python -m sim paper trace=DIR [hw=rtx4090.yaml] [slots=64] [T=0.005] [sensitivity=published] [out=FILE.md]`."""

from __future__ import annotations

import json
from pathlib import Path

from sim.args import parse_args


def main(argv: list[str]) -> int:
    from sim import atomic
    from sim.paper import PaperArgs, gaps, markdown, run_paper

    a = parse_args(PaperArgs, argv)
    rows = run_paper(a)
    table = markdown(rows) + "\n\n" + gaps(rows)
    title = (f"trace `{a.trace}`, hw `{a.hw}`, model `{a.model}`, {a.slots}-slot cache, T = {a.T}, "
             f"sensitivities: {a.sensitivity}, DP fit: {a.fit}, seed {a.seed}")
    print(title)
    print(table)
    if any(r["prefetch_modelled"] for r in rows):
        print("* prefetch predictions modelled (the trace has no pre-gating logits)")
    if a.out:
        out = Path(a.out)
        atomic.write_text(out, f"{title}\n\n{table}\n")
        atomic.write_text(out.with_suffix(".json"), json.dumps(rows, indent=2))
    return 0
