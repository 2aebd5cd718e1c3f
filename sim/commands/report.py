"""`python -m sim report DIR... [out=FILE.html] [baseline=POLICY] [title=TEXT]`

One self-contained plotly HTML page from sweep folders and run folders (sim/sweep/report.py):
Pareto front, TPOT vs cache size, speedup over the baseline, hit rate per layer, and the timeline
of each run folder. The default `out` is `DIR/report.html` for one folder, `report.html` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sim.args import parse_args
from sim.errors import UserError


@dataclass
class ReportOptions:
    out: str = ""
    baseline: str = ""
    title: str = ""


def main(argv: list[str]) -> int:
    dirs = [Path(a) for a in argv if "=" not in a]
    opts = parse_args(ReportOptions, [a for a in argv if "=" in a], allow_config_file=False)
    if not dirs:
        raise UserError("give one or more sweep or run folders: python -m sim report DIR... [out=FILE.html]")
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"{d}: folder not found")
    out = Path(opts.out) if opts.out else (dirs[0] / "report.html" if len(dirs) == 1 else Path("report.html"))
    import polars as pl

    from sim import atomic
    from sim.sweep.report import write_report

    atomic.check_output_path(out, folder=False, what="report")  # a valid name, a place to write
    if out.is_dir() or not out.parent.exists():
        raise UserError(f"out={out}: not a file path in an existing folder")

    with atomic.claim_file(out, need_bytes=8e6, what="report"):  # checked and claimed before the work
        try:
            write_report(dirs, out, baseline=opts.baseline, title=opts.title)
        except pl.exceptions.PolarsError as err:  # a table of the right kinds that still does not fit
            line = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise UserError(f"cannot draw a report of {', '.join(map(str, dirs))}: its tables do not have "
                            f"the expected columns ({line})") from None
    print(f"report: {out}")
    return 0
