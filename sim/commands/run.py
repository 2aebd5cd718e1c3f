"""`python -m sim run hw=jetson.yaml [trace=DIR] [model=PRESET] [policy=PRESET] [key=value ...]`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sim.config import parse_run_config
from sim.metrics import BOUND_KEYS, SUMMARY_KEYS


def main(argv: list[str]) -> int:
    from sim.results import default_out, summary_table, write_results
    from sim.runner import simulate

    cfg = parse_run_config(argv)
    name = cfg.name or f"{cfg.policy}-{Path(cfg.hw).stem}"
    out = Path(cfg.out) if cfg.out else default_out(name)
    from sim.atomic import check_new_dir

    check_new_dir(out)
    t0 = time.perf_counter()
    res = simulate(cfg)  # with oracle/bound set, the bound keys too (sim/oracle.py)
    wall = time.perf_counter() - t0
    write_results(res, out, report=cfg.report, title=name)
    s = res.summary
    print(f"{name}: {s['tokens_decode']} decode tokens, cache {s['cache_slots']} experts of "
          f"{s['expert_bytes'] / 1e6:.1f} MB, simulated in {wall:.2f} s")
    keys = list(SUMMARY_KEYS) + [k for k in BOUND_KEYS + ("prefetch_modelled",) if k in s]
    print(summary_table(s, keys))
    print(f"results: {out}", file=sys.stderr)
    return 0
