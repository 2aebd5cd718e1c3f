"""`confirm`: run each policy arm for real (`realrun`) and in the simulator (`run`) on the same
trace, preset, cache size and calibrated profile; report the simulator's error and whether it
ranks the arms as the machine does.

Arms (`arms=a,b,...`): a policy preset name (`policy=<name>`), or one of
    half          the first arm's policy with half the cache (`cache.slots / 2`)
    cpu_on_miss   baseline (top-k, global LRU, no prefetch) with missed experts computed by the
                  CPU from host memory (Fiddler); it runs with `store=host`, where such a
                  system keeps its experts (the profile's host_to_device link describes it)
    batchN        a serving arm (docs/serving.md): the first arm's policy under a closed loop of
                  N users with no think time, 2N requests of at most `tokens` prompt and `tokens`
                  output tokens each, continuously batched (prefill included); the real run
                  executes the batched steps (each expert once over its tokens)
    tiersN        three tiers (docs/tiers.md): the first arm's policy with its experts on disk
                  (`store=disk`) behind a host cache of N experts (`host_cache.slots=N`, lru)
                  in front of the device cache; the real run reads experts from the disk into
                  host buffers and copies them from there (`sim/realrun/tiers.py`). Its profile
                  is the confirm's with what the simulator needs for a host tier: on device=cpu
                  (`unified_memory: true`: slots and host buffers are both host memory) the run
                  is simulated as a discrete device (`unified_memory: false`), and a hop measured
                  as sharing the device's memory bandwidth is simulated without that contention
                  (the simulator models neither with a host tier); the row's `profile_changes`
                  says what was changed. Its per-tier figures are the row's `*_tier` columns.
The other arms whose experts are on disk run storage-direct (`host_cache.slots=0`), whatever
host tier the profile describes.
A replay arm is decode only (`engine.prefill=false`): it starts with an empty cache and decodes
`tokens` tokens. A batched arm's figures are its requests': `tpot_mean_s` the mean over its
requests of their mean TPOT, `tpot_p90_s` the p90 over them (pooled over its runs), and
`throughput_tokens_per_s`; stall share and hit rate are per decode token, so not compared for it.
The verdict's errors and ranking are over the replay arms; the batched arms have their own
(`median_abs_error_tpot_mean_batched`, ...). The real runs go round-robin over the arms, `repeats` rounds of short runs, and each
arm's measured figures are means over its runs (p90 over their tokens pooled).

Why many short rounds: a shared virtual machine drifts. Here a disk's speed moved by 10-20% and a
batch-1 expert's compute by up to 75% within a minute (other tenants), so one run of an arm
meets one moment of the machine and a calibration another. Spread over the whole confirm, every
arm's runs and the calibration sample the same stretch of time: calibration sessions before the
first round and after the last (`bracket=true`), and (`probes=true`) a short probe of the machine
at the model's sizes (links, expert and non-expert compute, the CPU worker) before every real
run, all pooled into the one profile the simulator then uses for every arm. The simulator sees
nothing of the real runs themselves.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from sim import bundled
from sim.config import parse_run_config
from sim.errors import UserError
from sim.machine.hardware import HardwareProfile

DEFAULT_ARMS = "baseline,mixtral_offloading,adapmoe,half,cpu_on_miss,batch4,batch8"
METRICS = ("tpot_mean_s", "tpot_p90_s", "stall_share", "hit_rate")
#: what a batched arm (a serving run) is compared on, beside `tpot_mean_s` and `tpot_p90_s`
BATCH_METRICS = ("throughput_tokens_per_s",)
#: a three-tier arm's per-tier figures (docs/tiers.md), measured and simulated: `<measured|simulated>_<key>_tier`
TIER_METRICS = ("host_cache_hit_rate", "host_reads", "host_reads_bypassed", "bytes_per_token_storage_to_host",
                "bytes_per_token_host_to_device", "stall_s_per_token_storage_to_host",
                "stall_s_per_token_host_to_device", "link_utilization_storage_to_host",
                "link_utilization_host_to_device")


@dataclass
class ConfirmOptions:
    profile: str = ""  # a profile to use; empty: calibrate first (or calibrate=true)
    calibrate: bool = False
    arms: str = DEFAULT_ARMS
    trace: str = ""  # default: traces/toy when bundled, else a seeded synthetic Mixtral-shaped trace
    model: str = "mixtral-mini"
    device: str = "cpu"
    store: str = "disk"
    slots: int = 64  # cache.slots of the arms (half: slots / 2)
    tokens: int = 16  # decode tokens per real run of an arm
    layers: int = 0  # replay only the first N MoE layers (0: all)
    repeats: int = 8  # rounds of real runs (round-robin over the arms); means over rounds
    seed: int = 0
    out: str = ""
    store_dir: str = ""
    threads: int = 1
    pin: bool = True  # main thread and workers on separate CPUs
    quick: bool = False  # a quick calibration (tests)
    bracket: bool = True  # calibrate again after the last round; the profile pools every session
    probes: bool = True  # with bracket: probe the machine (model's sizes) before each real run, pooled too
    cal_repeats: int = 15
    progress: bool = True


@dataclass
class Arm:
    name: str
    overrides: list[str]
    store: str
    users: int = 0  # a batched arm's closed-loop users (0: a batch-1 replay arm)
    host_slots: int = 0  # a three-tier arm's host cache in experts (0: no host tier)


def parse_arms(spec: str, opts: ConfirmOptions) -> list[Arm]:
    from policies.presets import PRESETS

    names = [a.strip() for a in spec.split(",") if a.strip()]
    if len(names) < 2:
        raise UserError("confirm needs at least two arms (arms=a,b,...) to compare a ranking")
    out, first = [], None
    for name in names:
        if name == "half":
            base = first or "baseline"
            out.append(Arm(f"{base}_half_cache", [f"policy={base}", f"cache.slots={max(1, opts.slots // 2)}"],
                           opts.store))
        elif name == "cpu_on_miss":
            out.append(Arm("cpu_on_miss", ["policy=baseline", "placement.name=cpu_on_miss"], "host"))
        elif name.startswith("batch") and name[5:].isdigit() and int(name[5:]) >= 1:
            if opts.tokens < 2:
                raise UserError(f"arm {name}: a batched arm's requests need tokens >= 2 decode positions "
                                f"for a TPOT (tokens={opts.tokens})")
            users, base = int(name[5:]), first or "baseline"
            out.append(Arm(f"{base}_batch{users}", [
                f"policy={base}", "workload.kind=closed", f"workload.users={users}", f"workload.requests={2 * users}",
                f"workload.max_prompt={opts.tokens}", f"workload.max_output={opts.tokens}"], opts.store, users))
        elif name.startswith("tiers") and name[5:].isdigit() and int(name[5:]) >= 1:
            slots, base = int(name[5:]), first or "baseline"
            out.append(Arm(f"{base}_tiers{slots}", [f"policy={base}", f"host_cache.slots={slots}"], "disk",
                           host_slots=slots))
        elif name in PRESETS:
            out.append(Arm(name, [f"policy={name}"], opts.store))
            first = first or name
        else:
            raise UserError(f"unknown arm {name!r}; arms are policy presets ({', '.join(sorted(PRESETS))}), "
                            "half, cpu_on_miss, batchN (N >= 1 users) or tiersN (N >= 1 host-cache experts)")
    if len({a.name for a in out}) != len(out):
        raise UserError("the same arm is listed twice")
    return out


def profile_for(hw: HardwareProfile, store: str, tiered: bool = False) -> HardwareProfile:
    """The profile with its expert tier set to where the arm keeps its experts; `tiered` (a `tiersN`
    arm): with `tier_changes` applied, UserError if it lacks a hop of the host tier."""
    tier = "storage" if store == "disk" else "host"
    if f"{tier}_to_device" not in hw.links:
        raise UserError(f"profile {hw.name} has no {tier}_to_device link, needed for store={store} "
                        "(calibrate with store=disk measures both the disk and host memory)")
    hw = dataclasses.replace(hw, expert_tier=tier)
    if not tiered:
        return hw
    for hop in ("storage_to_host", "host_to_device"):
        if hop not in hw.links:
            raise UserError(f"profile {hw.name} has no {hop} link, needed for a tiersN arm (a host cache in front "
                            "of the disk; calibrate with store=disk measures it)")
    links = {name: dataclasses.replace(link, shares_memory_bandwidth=False) if name in TIER_HOPS else link
             for name, link in hw.links.items()}
    return dataclasses.replace(hw, unified_memory=False, links=links)


TIER_HOPS = ("storage_to_host", "host_to_device")


def tier_changes(hw: HardwareProfile) -> str:
    """What `profile_for(..., tiered=True)` changes in `hw` for a three-tier arm ('' for nothing): the
    simulator has no host tier with unified memory, nor memory contention on a tiered run's hops."""
    out = ["unified_memory: false (device=cpu: slots and host buffers are both host memory)"] if hw.unified_memory else []
    out += [f"links.{hop}.shares_memory_bandwidth: false (measured true; not modelled with a host tier)"
            for hop in TIER_HOPS if hop in hw.links and hw.links[hop].shares_memory_bandwidth]
    return "; ".join(out)


def default_trace(opts: ConfirmOptions):
    """(trace, description): traces/toy when bundled, else a synthetic Mixtral-shaped trace."""
    from sim.runner import load_trace

    if opts.trace:
        return load_trace(opts.trace), opts.trace
    if (bundled.traces() / "toy" / "meta.yaml").is_file():
        return load_trace("traces/toy"), "traces/toy"
    from sim.trace.synthetic import random_trace

    tr = random_trace(np.random.default_rng(opts.seed), tokens=max(opts.tokens, 1), layers=32, experts=8,
                      top_k=2, locality=0.5, pregate_depth=2, name="synthetic-mixtral")
    return tr, f"synthetic (sim.trace.synthetic.random_trace, seed {opts.seed}, locality 0.5)"


def plan_arms(opts: ConfirmOptions, arms: list[Arm], hw: HardwareProfile, trace) -> list[tuple]:
    """(arm, config, trace, profile) per arm: the same configuration for `run` and `realrun`."""
    from sim.realrun.build import preset_of, with_layers

    common = [f"model={opts.model}", f"cache.slots={opts.slots}", f"seed={opts.seed}", "report=false"]
    replay = ["engine.prefill=false", f"engine.max_tokens={opts.tokens}"]  # a serving arm's lengths: its workload's
    plans = []
    for arm in arms:
        direct = [] if arm.host_slots else ["host_cache.slots=0"]  # storage-direct unless a tiersN arm
        cfg = parse_run_config(common + ([] if arm.users else replay) + direct + arm.overrides)
        cfg2, tr = with_layers(cfg, trace, preset_of(cfg, trace), opts.layers)
        plans.append((arm, cfg2, tr, profile_for(hw, arm.store, arm.host_slots > 0)))
    return plans


def real_rounds(opts: ConfirmOptions, plans: list[tuple], bar=None, before=None) -> dict[str, list]:
    """`repeats` rounds over the arms, round-robin; `before()` runs before each real run."""
    from sim.realrun.build import RealOptions
    from sim.realrun.run import KeptStores, real_run

    measured: dict[str, list] = {arm.name: [] for arm, *_ in plans}
    keep = KeptStores()  # the host-memory store is built once, not before every run
    try:
        for _ in range(opts.repeats):
            for arm, cfg, tr, hw_arm in plans:
                ropts = RealOptions(device=opts.device, store=arm.store, threads=opts.threads,
                                    store_dir=opts.store_dir, progress=opts.progress, pin=opts.pin)
                if before is not None:
                    before()
                measured[arm.name].append(real_run(cfg, ropts, trace=tr, hw=hw_arm, keep=keep))
                if bar is not None:
                    bar.update()
    finally:
        keep.close()
    return measured


def with_link_speed(hw: HardwareProfile, factor: float) -> HardwareProfile:
    """`hw` with its expert-tier link `factor` times slower (latency and bytes alike)."""
    name = f"{hw.expert_tier}_to_device"
    link = hw.links[name]
    scaled = dataclasses.replace(link, latency_s=link.latency_s * factor, bandwidth_Bps=link.bandwidth_Bps / factor)
    return dataclasses.replace(hw, links={**hw.links, name: scaled})


def run_link_tpot_s(cfg, tr, hw_arm: HardwareProfile, run, cal_copy_s: float | None,
                    headline_s: float) -> tuple[float, float | None]:
    """The diagnostic "the link as this run met it": (simulated mean TPOT with the link scaled by the
    run's own mean copy time over the calibration's, that factor). Without copies in the run or a
    calibration of this confirm, the headline simulation and None."""
    from sim.runner import simulate

    real_copy_s = run.summary.get("realrun_copy_mean_s")
    if real_copy_s is None or not cal_copy_s:
        return headline_s, None
    factor = real_copy_s / cal_copy_s
    return figure(simulate(cfg, trace=tr, hw=with_link_speed(hw_arm, factor)), "tpot_mean_s"), factor


def figure(res, metric: str) -> float | None:
    """One run's figure `metric` (a `METRICS` or `BATCH_METRICS` name): its summary's for a
    replay; for a serving run (a batched arm) `tpot_mean_s` is the mean over its requests of their
    mean TPOT, `tpot_p90_s` their p90, `throughput_tokens_per_s` the summary's; None where a
    figure is not defined for the run (stall share and hit rate of a serving run, throughput of a replay)."""
    if res.requests is None:
        return None if metric in BATCH_METRICS else float(res.summary[metric])
    tpot = res.requests["tpot_mean_s"].drop_nulls().to_numpy()  # requests with >= 2 output tokens
    if metric in ("tpot_mean_s", "tpot_p90_s"):
        if not tpot.size:
            return None
        return float(tpot.mean() if metric == "tpot_mean_s" else np.percentile(tpot, 90))
    v = res.summary.get(metric) if metric in BATCH_METRICS else None
    return None if v is None else float(v)


def compare(plans: list[tuple], measured: dict[str, list], hw: HardwareProfile, cal=None) -> list[tuple]:
    """Simulate every arm on `hw`; one row of measured and simulated figures per arm.

    With `cal` (the pooled calibration `Measured` of this confirm) each row also has the diagnostic
    `simulated_run_link_tpot_mean_s`: each real run simulated with the link scaled to the speed
    that run's copies had (`realrun_copy_mean_s`) against the calibration's copies of the same
    size, mean over the runs. It is not a prediction (it reads the real run); it splits the
    error into the link's drift between calibration and run, and the rest of the model."""
    from sim.runner import simulate

    rows = []
    for arm, cfg, tr, _hw in plans:
        hw_arm = profile_for(hw, arm.store, arm.host_slots > 0)
        sim = simulate(cfg, trace=tr, hw=hw_arm)
        runs = measured[arm.name]
        row: dict[str, Any] = {"arm": arm.name, "store": arm.store, "config": " ".join(arm.overrides),
                               "cache_slots": sim.summary["cache_slots"],
                               "tokens": (sim.summary["tokens_decode"] if sim.requests is None  # a batched arm's:
                                          else int(sim.requests["output_tokens"].sum()))}  # its output tokens
        row["users"] = arm.users
        for m in METRICS + BATCH_METRICS:
            real_v = measured_over_runs(runs, m)
            sim_v = figure(sim, m)
            row[f"measured_{m}"] = real_v
            row[f"simulated_{m}"] = sim_v
            relative = m.startswith("tpot") or m in BATCH_METRICS
            row[f"error_{m}"] = (None if real_v is None or sim_v is None
                                 else (sim_v - real_v) / real_v if relative else sim_v - real_v)
        means = [figure(r, "tpot_mean_s") for r in runs]
        row["measured_tpot_mean_s_spread"] = float(np.ptp(means) / row["measured_tpot_mean_s"]) if len(runs) > 1 else None
        # the measurement's own uncertainty: the standard error of the mean over the arm's runs, relative
        row["measured_tpot_mean_s_rel_sem"] = (float(np.std(means, ddof=1) / math.sqrt(len(runs)) / row["measured_tpot_mean_s"])
                                               if len(runs) > 1 else None)
        if arm.users:  # a batched step's loads are no one token's: the bytes per output token instead
            row["measured_demand_loads_per_token"] = row["simulated_demand_loads_per_token"] = None
        else:
            row["measured_demand_loads_per_token"] = measured_over_runs(runs, "demand_loads_per_token")
            row["simulated_demand_loads_per_token"] = float(sim.summary["demand_loads_per_token"])
        row["host_slots"] = arm.host_slots
        row["profile_changes"] = tier_changes(hw) if arm.host_slots else ""
        for m in TIER_METRICS:  # a three-tier arm's per-tier figures (None for the other arms)
            row[f"measured_{m}_tier"] = measured_over_runs(runs, m) if arm.host_slots else None
            row[f"simulated_{m}_tier"] = float(sim.summary[m]) if arm.host_slots else None
        kind = "disk" if arm.store == "disk" else "host"
        # (a three-tier arm's copies are host -> device after reads: the diagnostic scales one link, not two)
        cal_copy_s = (cal.copy_mean_s(kind, sim.summary["expert_bytes"]) if cal is not None and not arm.host_slots
                      else None)
        diag = [run_link_tpot_s(cfg, tr, hw_arm, r, cal_copy_s, row["simulated_tpot_mean_s"]) for r in runs]
        factors = [f for _, f in diag if f is not None]
        row["link_speed_factor"] = float(np.mean(factors)) if factors else None
        row["simulated_run_link_tpot_mean_s"] = float(np.mean([t for t, _ in diag]))
        row["error_run_link_tpot_mean_s"] = row["simulated_run_link_tpot_mean_s"] / row["measured_tpot_mean_s"] - 1
        rows.append((row, runs[-1], sim))
    return rows


def measured_over_runs(runs: list, metric: str) -> float | None:
    """An arm's measured figure over its real runs: the mean over runs (each the same tokens, so the
    mean TPOT is the mean over every token measured), the p90 over the tokens of all runs pooled
    (a batched arm's: over the requests of all runs pooled; `figure` says what each is).

    Means, not medians: the runs are spread over the whole confirm so that, like the pooled
    calibration, they average over the machine's drift; a median would keep one moment of it."""
    if metric == "tpot_p90_s":
        if runs[0].requests is not None:
            pooled = np.concatenate([r.requests["tpot_mean_s"].drop_nulls().to_numpy() for r in runs])
        else:
            pooled = np.concatenate([r.tokens["latency_s"].to_numpy() for r in runs])
        return float(np.percentile(pooled, 90))
    values = [figure(r, metric) if metric in METRICS + BATCH_METRICS else r.summary[metric] for r in runs]
    return None if any(v is None for v in values) else float(np.mean(values))


def verdict(frame: pl.DataFrame) -> dict[str, Any]:
    """The errors and the ranking over the replay arms, and the batched arms' errors (`_batched`)."""
    if "users" in frame.columns and (frame["users"] > 0).any():
        batched = frame.filter(pl.col("users") > 0)
        replay = frame.filter(pl.col("users") == 0)
        return {**(_verdict(replay) if replay.height else {}), **_batched_verdict(batched)}
    return _verdict(frame)


def _batched_verdict(frame: pl.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {"batched_arms": frame["arm"].to_list()}
    for m, tag in (("tpot_mean_s", "tpot_mean"), ("tpot_p90_s", "tpot_p90"), ("throughput_tokens_per_s", "throughput")):
        err = np.abs(frame[f"error_{m}"].to_numpy())
        out[f"median_abs_error_{tag}_batched"] = float(np.median(err))
        out[f"max_abs_error_{tag}_batched"] = float(err.max())
    return out


def _verdict(frame: pl.DataFrame) -> dict[str, Any]:
    from scipy.stats import kendalltau

    err = np.abs(frame["error_tpot_mean_s"].to_numpy())
    meas, sim = frame["measured_tpot_mean_s"].to_numpy(), frame["simulated_tpot_mean_s"].to_numpy()
    tau = float(kendalltau(meas, sim).statistic) if len(meas) > 1 else float("nan")
    same = list(np.argsort(meas, kind="stable")) == list(np.argsort(sim, kind="stable"))
    sem = frame["measured_tpot_mean_s_rel_sem"].drop_nulls().to_numpy() if "measured_tpot_mean_s_rel_sem" in frame.columns else []
    return {"median_abs_error_tpot_mean": float(np.median(err)), "max_abs_error_tpot_mean": float(err.max()),
            "median_rel_sem_tpot_mean": float(np.median(sem)) if len(sem) else None,
            "max_rel_sem_tpot_mean": float(np.max(sem)) if len(sem) else None,
            "median_abs_error_tpot_p90": float(np.median(np.abs(frame["error_tpot_p90_s"].to_numpy()))),
            **_run_link_verdict(frame), **_separated_pairs(frame),
            "kendall_tau": tau if not math.isnan(tau) else None, "ranking_identical": bool(same),
            "ranking_measured": [frame["arm"][int(i)] for i in np.argsort(meas, kind="stable")],
            "ranking_simulated": [frame["arm"][int(i)] for i in np.argsort(sim, kind="stable")]}


def _separated_pairs(frame: pl.DataFrame) -> dict[str, Any]:
    """The ranking where the measurement can tell: pairs of arms whose measured mean TPOTs are more
    than two standard errors apart (their runs' errors combined), and how many of those the
    simulator orders the other way or ties. Two arms within the measurement's noise of each other have
    no measured order to agree with. None without standard errors (one run per arm)."""
    if "measured_tpot_mean_s_rel_sem" not in frame.columns or frame["measured_tpot_mean_s_rel_sem"].null_count():
        return {"pairs_separated": None, "pairs_separated_disagreeing": None}
    meas, sim = frame["measured_tpot_mean_s"].to_numpy(), frame["simulated_tpot_mean_s"].to_numpy()
    se = frame["measured_tpot_mean_s_rel_sem"].to_numpy() * meas
    separated = disagree = 0
    for i in range(len(meas)):
        for j in range(i + 1, len(meas)):
            if abs(meas[i] - meas[j]) > 2 * math.hypot(se[i], se[j]):
                separated += 1
                disagree += int((meas[i] - meas[j]) * (sim[i] - sim[j]) <= 0)
    return {"pairs_separated": separated, "pairs_separated_disagreeing": disagree}


def _run_link_verdict(frame: pl.DataFrame) -> dict[str, Any]:
    """Median and max |error| of the diagnostic "the link as each run met it", over the arms whose
    runs copied experts (None without any)."""
    if "error_run_link_tpot_mean_s" not in frame.columns or frame["link_speed_factor"].null_count() == frame.height:
        return {"median_abs_error_tpot_mean_run_link": None, "max_abs_error_tpot_mean_run_link": None}
    # over the arms whose runs copied experts: for the others it is the headline error again
    err = np.abs(frame.filter(pl.col("link_speed_factor").is_not_null())["error_run_link_tpot_mean_s"].to_numpy())
    return {"median_abs_error_tpot_mean_run_link": float(np.median(err)),
            "max_abs_error_tpot_mean_run_link": float(err.max())}


def figure_html(frame: pl.DataFrame, title: str) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    hi = 0.0
    for m, sym in (("tpot_mean_s", "circle"), ("tpot_p90_s", "diamond")):
        x = frame[f"measured_{m}"].to_numpy() * 1e3
        y = frame[f"simulated_{m}"].to_numpy() * 1e3
        hi = max(hi, float(x.max()), float(y.max()))
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers+text", text=frame["arm"].to_list(), textposition="top center",
                                 marker={"symbol": sym, "size": 10}, name=m.replace("_s", " (ms)")))
    fig.add_trace(go.Scatter(x=[0, hi * 1.1], y=[0, hi * 1.1], mode="lines", name="y = x",
                             line={"dash": "dash", "color": "gray"}))
    fig.update_layout(title=title, xaxis_title="measured (ms)", yaxis_title="simulated (ms)", template="plotly_white")
    return fig.to_html(include_plotlyjs=True, full_html=True)  # self-contained: opens offline
