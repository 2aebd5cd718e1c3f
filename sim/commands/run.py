"""`python -m sim run hw=jetson.yaml [trace=DIR] [model=PRESET] [policy=PRESET] [key=value ...]`.

The results folder (`out=`, default `results/<timestamp>-<name>`) is claimed before the simulation
starts (`sim.atomic`): a second run to the same folder is refused at once, and a run that fails
leaves nothing behind. An existing non-empty folder is refused unless `overwrite=true`, which
replaces it once the new one is complete. `config=DIR/config.yaml` reruns the run of folder DIR
(the same numbers) into a new folder.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sim.config import parse_run_config
from sim.results.metrics import BOUND_KEYS, SUMMARY_KEYS

#: a tiered run's keys the summary table prints (docs/metrics.md, "Memory tiers")
TIER_PRINTED = ("host_cache_slots", "host_cache_hit_rate", "bytes_per_token_storage_to_host",
                "stall_s_per_token_storage_to_host", "stall_s_per_token_host_to_device",
                "link_utilization_storage_to_host", "link_utilization_host_to_device")


def main(argv: list[str]) -> int:
    from sim import atomic
    from sim.results.folder import REPORT_BYTES, RESULTS_BYTES, default_out, fill_results, summary_table
    from sim.runner import simulate

    cfg = parse_run_config(argv)
    name = cfg.name or f"{cfg.policy}-{Path(cfg.hw).stem}"
    out = Path(cfg.out) if cfg.out else default_out(name)
    need = RESULTS_BYTES + (REPORT_BYTES if cfg.report else 0)
    with atomic.new_dir(out, overwrite=cfg.overwrite, need_bytes=need,
                        replaces=("summary.json", "config.yaml")) as tmp:
        t0 = time.perf_counter()
        res = simulate(cfg)  # with oracle/bound set, the bound keys too (sim/offline/oracle.py)
        wall = time.perf_counter() - t0
        fill_results(res, tmp, report=cfg.report, title=name)
    s = res.summary
    if res.requests is not None:  # a serving workload
        from sim.serving.metrics import SERVING_SUMMARY_KEYS

        print(f"{name}: {s['requests']} requests ({cfg.workload.kind} loop), {s['steps']} steps, cache "
              f"{s['cache_slots']} experts of {s['expert_bytes'] / 1e6:.1f} MB, simulated in {wall:.2f} s")
        print(summary_table(s, list(SERVING_SUMMARY_KEYS) + ["link_utilization", "compute_utilization"]
                            + [k for k in TIER_PRINTED if k in s]))
        print(f"results: {out}", file=sys.stderr)
        return 0
    print(f"{name}: {s['tokens_decode']} decode tokens, cache {s['cache_slots']} experts of "
          f"{s['expert_bytes'] / 1e6:.1f} MB, simulated in {wall:.2f} s")
    keys = list(SUMMARY_KEYS) + [k for k in BOUND_KEYS + ("prefetch_modelled", "prefetch_modelled_assumption",
                                                         "gating_T_solved", "in_sample_fit",
                                                         "placement_reserved_bytes") if k in s]
    keys += [k for k in TIER_PRINTED if k in s]  # a tiered run (docs/tiers.md): link_utilization is the device hop's
    print(summary_table(s, keys))
    print(f"results: {out}", file=sys.stderr)
    return 0
