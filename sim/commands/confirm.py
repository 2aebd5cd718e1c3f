"""`python -m sim confirm [profile=FILE | calibrate] [arms=a,b,...] [trace=DIR] [model=PRESET]
[device=cpu|cuda] [store=disk|host] [slots=N] [tokens=N] [repeats=N] [out=DIR]`.

Calibrates this machine (or uses `profile=`), then runs every policy arm for real and in the
simulator on the same trace and prints, per arm, measured and simulated mean and p90 TPOT, stall
share, hit rate and the errors; then the median and max absolute error over arms, the
measurement's own noise (standard error of each arm's mean over its runs), whether the ranking
agrees (Kendall tau; and over the pairs of arms the measurement separates), and a diagnostic:
each real run simulated with the link at the speed its own copies had; the batched arms (serving
runs, `batchN`) with their throughput and their own errors. Writes `confirm.parquet`,
`confirm.json`, `confirm.html` (simulated vs measured, with the y = x line), the profile used and
each arm's results folders.

Every key, with its type, default and meaning: `python -m sim confirm --help`. `calibrate` alone
means `calibrate=true`; an existing non-empty `out=` folder is replaced only with `overwrite=true`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sim.realrun.confirm import ConfirmOptions


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def _pair(a: float | None, b: float | None, width: int, digits: int) -> str:
    if a is None or b is None:
        return f"{'-':>{2 * width + 3}}"
    return f"{a:{width}.{digits}f} / {b:{width}.{digits}f}"


def print_table(rows: list[dict], v: dict) -> None:
    head = (f"{'arm':28} {'TPOT mean meas/sim (ms)':>24} {'err':>7} {'TPOT p90 meas/sim (ms)':>24} {'err':>7} "
            f"{'stall share meas/sim':>21} {'hit rate meas/sim':>18}")
    print(head)
    for r in rows:
        print(f"{r['arm']:28} {r['measured_tpot_mean_s'] * 1e3:11.2f} / {r['simulated_tpot_mean_s'] * 1e3:9.2f} "
              f"{_pct(r['error_tpot_mean_s']):>7} {r['measured_tpot_p90_s'] * 1e3:11.2f} / "
              f"{r['simulated_tpot_p90_s'] * 1e3:9.2f} {_pct(r['error_tpot_p90_s']):>7} "
              f"{_pair(r['measured_stall_share'], r['simulated_stall_share'], 9, 3)} "
              f"{_pair(r['measured_hit_rate'], r['simulated_hit_rate'], 7, 3)}")
    batched = [r for r in rows if r.get("users")]
    rows = [r for r in rows if not r.get("users")]
    if batched:
        print("batched arms (closed loop, TPOT over requests): throughput meas/sim (tokens/s), error")
        for r in batched:
            print(f"  {r['arm']:26} {r['measured_throughput_tokens_per_s']:9.2f} / "
                  f"{r['simulated_throughput_tokens_per_s']:9.2f} {_pct(r['error_throughput_tokens_per_s']):>7}")
        print(f"  over {len(batched)} batched arms: mean TPOT error median "
              f"{v['median_abs_error_tpot_mean_batched'] * 100:.1f}%, max {v['max_abs_error_tpot_mean_batched'] * 100:.1f}%; "
              f"throughput median {v['median_abs_error_throughput_batched'] * 100:.1f}%, "
              f"max {v['max_abs_error_throughput_batched'] * 100:.1f}%")
    if not rows:
        return
    tau = "-" if v["kendall_tau"] is None else f"{v['kendall_tau']:.3f}"
    print(f"mean TPOT error over {len(rows)} replay arms: median {v['median_abs_error_tpot_mean'] * 100:.1f}%, "
          f"max {v['max_abs_error_tpot_mean'] * 100:.1f}%; p90 median {v['median_abs_error_tpot_p90'] * 100:.1f}%")
    if v.get("median_rel_sem_tpot_mean") is not None:
        print(f"  measurement noise: the standard error of an arm's measured mean TPOT over its runs is "
              f"{v['median_rel_sem_tpot_mean'] * 100:.1f}% (median), up to {v['max_rel_sem_tpot_mean'] * 100:.1f}%")
    print(f"ranking by mean TPOT: Kendall tau {tau}, identical: {str(v['ranking_identical']).lower()}")
    if v.get("pairs_separated") is not None:
        n = len(rows) * (len(rows) - 1) // 2
        print(f"  pairs of arms the measurement separates (> 2 standard errors apart): {v['pairs_separated']} of {n}, "
              f"ordered otherwise by the simulator: {v['pairs_separated_disagreeing']}")
    print(f"  measured : {' < '.join(v['ranking_measured'])}")
    print(f"  simulated: {' < '.join(v['ranking_simulated'])}")
    if v.get("median_abs_error_tpot_mean_run_link") is None:
        return
    print("diagnostic, not a prediction: each real run simulated with the link at the speed its own copies had "
          "(vs calibration's copies)")
    for r in rows:
        f = r["link_speed_factor"]
        speed = "no copies" if f is None else f"copies took {f:.3f}x calibration's"
        print(f"  {r['arm']:28} {speed:30} TPOT sim {r['simulated_run_link_tpot_mean_s'] * 1e3:9.2f} ms "
              f"{_pct(r['error_run_link_tpot_mean_s']):>7}")
    print(f"  with the link as each run met it, over the arms that copied: median "
          f"{v['median_abs_error_tpot_mean_run_link'] * 100:.1f}%, max {v['max_abs_error_tpot_mean_run_link'] * 100:.1f}%")


@dataclass
class ConfirmCommandOptions(ConfirmOptions):
    overwrite: bool = False  # replace an existing non-empty out folder (the old one stays until the new one is whole)


def main(argv: list[str]) -> int:
    import polars as pl
    import yaml
    from tqdm import tqdm

    from sim import atomic
    from sim.args import parse_args
    from sim.commands.calibrate import write_profile
    from sim.machine.hardware import load_profile
    from sim.realrun.build import RealOptions, check_options
    from sim.realrun.confirm import (
        compare,
        default_trace,
        figure_html,
        parse_arms,
        plan_arms,
        real_rounds,
        verdict,
    )
    from sim.results.folder import default_out

    argv = ["calibrate=true" if a == "calibrate" else a for a in argv]
    opts = parse_args(ConfirmCommandOptions, argv, allow_config_file=False)
    check_options(RealOptions(device=opts.device, store=opts.store, threads=opts.threads))
    arms = parse_arms(opts.arms, opts)
    out = Path(opts.out) if opts.out else default_out("confirm")
    t0 = time.perf_counter()
    with atomic.new_dir(out, overwrite=opts.overwrite, need_bytes=32e6,
                        replaces=("confirm.json", "config.yaml")) as tmp:  # claimed before measuring
        trace, trace_desc = default_trace(opts)
        sessions, probes = [], []
        if opts.profile and not opts.calibrate:
            hw = load_profile(opts.profile)
            prof_note = f"given: {opts.profile}"
        else:
            from sim.realrun.calibrate import CalibrateOptions, add_probes, measure, merge, probe_machine
            from sim.realrun.profile import build_profile

            copts = CalibrateOptions(device=opts.device, store=opts.store, model=opts.model, repeats=opts.cal_repeats,
                                     store_dir=opts.store_dir, threads=opts.threads, quick=opts.quick,
                                     progress=opts.progress, pin=opts.pin)
            cmd = "python -m sim confirm " + " ".join(argv) + " (calibrate step)"

            def calibrated() -> tuple:
                """(profile, printable rows, the pooled measurements) of every session and probe so far."""
                pooled = add_probes(merge(sessions), probes)
                prof, cal_rows = build_profile(pooled, copts, cmd)
                write_profile(prof, tmp / "profile.yaml", f"# Measured by `{cmd}`.\n")
                return load_profile(str(tmp / "profile.yaml")), cal_rows, pooled

            sessions.append(measure(copts))
            hw = calibrated()[0]
            prof_note = "calibrated now (profile.yaml)"
        plans = plan_arms(opts, arms, hw, trace)
        before = ((lambda: probes.append(probe_machine(copts, sessions[0].backend)))
                  if sessions and opts.bracket and opts.probes else None)
        with tqdm(total=len(arms) * opts.repeats, desc="confirm arms", unit="run",
                  disable=None if opts.progress else True) as bar:
            measured = real_rounds(opts, plans, bar, before)
        if sessions and opts.bracket:
            sessions.append(measure(copts, sessions[0].backend))
        pooled = None
        if sessions:
            hw, cal_rows, pooled = calibrated()  # every calibration session and probe of this confirm
            prof_note = (f"calibrated now, {len(sessions)} session(s)"
                         + (f" and {len(probes)} machine probes" if probes else "") + " pooled (profile.yaml)")
            for what, value, spread in cal_rows:
                print(f"  {what:52} {value:34} {spread}", file=sys.stderr)
        results = compare(plans, measured, hw, pooled)
        rows = [r for r, _, _ in results]
        frame = pl.DataFrame(rows)
        v = verdict(frame)
        frame.write_parquet(tmp / "confirm.parquet")
        from sim.realrun.run import write_real_results
        from sim.results.folder import write_results

        for (row, real, sim) in results:
            write_real_results(real, RealOptions(device=opts.device, store=row["store"]), tmp / row["arm"] / "realrun",
                               report=False)
            write_results(sim, tmp / row["arm"] / "sim", report=False)
        meta = {"verdict": v, "profile": prof_note, "calibration_sessions": len(sessions), "machine_probes": len(probes), "trace": trace_desc, "model": opts.model,
                "device": opts.device, "store": opts.store, "slots": opts.slots, "tokens": opts.tokens,
                "layers": opts.layers, "repeats": opts.repeats, "command": "python -m sim confirm " + " ".join(argv),
                "wall_s": time.perf_counter() - t0}
        (tmp / "confirm.json").write_text(json.dumps(meta, indent=2))
        (tmp / "confirm.html").write_text(figure_html(frame, f"confirm: simulated vs measured TPOT ({hw.name})"))
        (tmp / "config.yaml").write_text(yaml.safe_dump({"confirm": vars(opts)}, sort_keys=False))
    print(f"confirm: {len(arms)} arms, model {opts.model}, trace {trace_desc}, {opts.tokens} decode tokens, "
          f"profile {prof_note}, {time.perf_counter() - t0:.0f} s")
    print_table(rows, v)
    print(f"results: {out}", file=sys.stderr)
    return 0
