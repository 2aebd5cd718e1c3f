"""`python -m sim sweep KEY=V1,V2,... [KEY=a:b:step] ... out=DIR [executor=local|ray] [jobs=N]
[ray.address=auto|HOST:PORT] [report=true] [baseline=POLICY] [progress=true] [extend=false]`

Simulates every point of the grid (the product of the value lists; any RunConfig key, e.g.
`hw=jetson.yaml,rtx4090.yaml policy=adapmoe,lru cache.slots=32:256:32 gating.T=0.001,0.005`),
writes `DIR/sweep.parquet` (one row per point) and `DIR/report.html`. Rerunning the same command
finishes an interrupted sweep (so a sweep takes no `overwrite=`: a new `out=` starts afresh). A
policy from a plug-in: `plugins=MODULE` (or FILE.py), a grid key like any run key; every worker
imports it too. Exit status: 0, 1 if any point failed, 2 for bad input. The options
besides the grid keys are the sweep's own; see sim/sweep/run.py and docs/sweeps.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from sim.args import parse_args
from sim.errors import UserError


@dataclass
class RayOptions:
    address: str = ""  # "" starts a local Ray instance; auto or HOST:PORT joins a cluster


@dataclass
class SweepOptions:
    out: str = ""  # the sweep folder (required); rerunning the same command there resumes it
    executor: str = "local"  # local | ray
    jobs: int = 0  # parallel points; 0: one per CPU
    ray: RayOptions = field(default_factory=RayOptions)
    report: bool = True  # write DIR/report.html at the end
    baseline: str = ""  # report: the policy speedups are relative to (default mixtral_offloading)
    progress: bool = True  # show a progress bar on stderr
    extend: bool = False  # reuse the finished points of a folder holding a different grid


OWN_KEYS = ("out", "executor", "jobs", "ray.address", "report", "baseline", "progress", "extend")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the sweep's own options, the grid) from the command line."""
    own, grid = [], []
    for arg in argv:
        key = arg.partition("=")[0]
        if "=" not in arg or key == "":
            raise UserError(f"argument {arg!r} is not of the form key=value")
        if key == "overwrite":
            raise UserError("sweep takes no overwrite=: rerunning the same command resumes its folder, extend=true "
                            "reuses the finished points for another grid; a new out= folder starts afresh")
        (own if key in OWN_KEYS or key.startswith("ray.") else grid).append(arg)
    return own, grid


def main(argv: list[str]) -> int:
    own, grid = split_argv(argv)
    opts = parse_args(SweepOptions, own, allow_config_file=False)
    if not opts.out:
        raise UserError("out=DIR is required (the sweep folder; rerun the same command to resume)")
    from sim.sweep import run_sweep

    res = run_sweep(grid, opts.out, executor=opts.executor, jobs=opts.jobs, ray_address=opts.ray.address,
                    progress=opts.progress, report=opts.report, baseline=opts.baseline, extend=opts.extend,
                    log=lambda msg: print(msg, file=sys.stderr))
    rate = f"{res.points_per_s:.2f} points/s" if res.ran else "nothing to run"
    if opts.report:
        print(f"report: {res.out / 'report.html'}")
    print(f"sweep: {res.points} points, {res.ran} run, {res.skipped} done before, {res.failed} failed, in "
          f"{res.wall_s:.1f} s ({rate}) -> {res.out / 'sweep.parquet'}"
          + (" (see the error column)" if res.failed else ""))
    return 1 if res.failed else 0
