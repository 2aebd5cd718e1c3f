"""`python -m sim report DIR... [out=FILE.html] [baseline=POLICY] [title=TEXT]`

One self-contained plotly HTML page from sweep folders and run folders (sim/sweep/report.py):
Pareto front, TPOT vs cache size, speedup over the baseline, hit rate per layer, and the timeline
of each run folder. One run folder alone gets its run report (timeline, hit rate per layer, TPOT
CDF: the `report.html` that `run` writes, drawn again from its tables). The default `out` is
`DIR/report.html` for one folder, `report.html` otherwise. A folder's own `report.html` is only
ever replaced by a report of the same kind (that folder alone): the report of several folders
written there is refused (give another out=).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sim.args import parse_args
from sim.errors import UserError


@dataclass
class ReportOptions:
    out: str = ""  # the HTML file to write (default DIR/report.html for one folder, else report.html)
    baseline: str = ""  # the policy speedups are relative to (default mixtral_offloading when present)
    title: str = ""  # the page's title (default: the folders' names)


def _is_run_folder(d: Path) -> bool:
    from sim.sweep.store import TABLE_FILE

    return (d / "summary.json").is_file() and not (d / TABLE_FILE).is_file()


def _own_report_of(out: Path, dirs: list[Path]) -> None:
    """Refuse to write over a folder's own report.html with a report of another kind."""
    from sim.sweep.store import REPORT_FILE, TABLE_FILE

    if out.name != REPORT_FILE:
        return
    owner = out.parent
    if not ((owner / TABLE_FILE).is_file() or (owner / "summary.json").is_file()):
        return
    if len(dirs) == 1 and dirs[0].resolve() == owner.resolve():
        return  # that folder's own kind of report, drawn again
    kind = "sweep" if (owner / TABLE_FILE).is_file() else "run"
    raise UserError(f"out={out} is the {kind} folder {owner}'s own report; the report of "
                    f"{', '.join(map(str, dirs))} goes elsewhere (out=FILE.html)")


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

    _own_report_of(out, dirs)
    run_alone = len(dirs) == 1 and _is_run_folder(dirs[0])
    if run_alone and opts.baseline:
        raise UserError("baseline= is for the report of sweeps and several runs; one run folder gets its run report")

    with atomic.claim_file(out, need_bytes=8e6, what="report"):  # checked and claimed before the work
        try:
            if run_alone:  # its run report, never a one-point sweep report
                from sim.results.report import run_folder_report, write_html

                fig = run_folder_report(dirs[0])
                if opts.title:
                    fig.update_layout(title=opts.title)
                write_html(fig, out)
            else:
                write_report(dirs, out, baseline=opts.baseline, title=opts.title)
        except pl.exceptions.PolarsError as err:  # a table of the right kinds that still does not fit
            line = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise UserError(f"cannot draw a report of {', '.join(map(str, dirs))}: its tables do not have "
                            f"the expected columns ({line})") from None
    print(f"report: {out}")
    return 0
