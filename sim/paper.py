"""The AdapMoE paper's experiment: AdapMoE's parts added one at a time, beside other policies.

`python -m sim paper trace=DIR hw=rtx4090.yaml` runs, on one trace, hardware and cache size:
mixtral_offloading (the baseline), + adaptive gating, + AdapMoE's pre-gating (staged, waited
for), + DP-sized caches (= `adapmoe`), `adapmoe` with the published DP inputs, `fiddler`,
`hobbit`, `belady` without prefetch and the best offline schedule (`oracle`), each for top-k and
for AdapMoE's gating, and our `adapmoe_yield`; and prints one markdown table. Every arm carries
its lower bound (`bound=true`, `sim/offline/lower_bound.py`) and its gap to it, and its gap to the
best offline schedule of its reference gating (top-k, or AdapMoE's; ours decides from the cache,
for which no offline schedule exists, so it is set beside AdapMoE's at a lower or equal dL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sim.config import parse_run_config
from sim.errors import UserError
from sim.runner import simulate


@dataclass
class PaperArgs:
    trace: str = "traces/toy"
    hw: str = "rtx4090.yaml"
    model: str = "mixtral-8x7b"
    slots: int = 64
    T: float = 0.005
    sensitivity: str = "published"  # published | trace | FILE
    fit: str = "trace"  # adapmoe_dp inputs: trace | published
    T_miss_factor: float = 1.2  # ours: budget for dropping an expert that must be loaded = factor x T
    seed: int = 0
    out: str = ""  # write the markdown table (and a .json beside it) here


def arms(a: PaperArgs) -> list[tuple[str, str, list[str]]]:
    """(label, reference gating, `run` arguments) of every arm."""
    g = ["gating.name=adapmoe", f"gating.T={a.T}", f"gating.sensitivity={a.sensitivity}"]
    adapmoe_pf = ["prefetch.wait=true", "prefetch.admit=on_use"]
    return [
        ("mixtral_offloading", "topk", ["policy=mixtral_offloading"]),
        ("+ adaptive gating", "adapmoe", ["policy=mixtral_offloading", *g]),
        ("+ AdapMoE pre-gating", "adapmoe", ["policy=mixtral_offloading", *g, *adapmoe_pf]),
        ("+ DP cache = adapmoe", "adapmoe", ["policy=adapmoe", *g[1:], f"cache.fit={a.fit}"]),
        ("adapmoe (published DP inputs)", "adapmoe", ["policy=adapmoe", *g[1:], "cache.fit=published"]),
        ("fiddler", "topk", ["policy=fiddler"]),
        ("hobbit", "topk", ["policy=hobbit", f"placement.sensitivity={a.sensitivity}"]),
        ("belady, no prefetch (top-k gating)", "topk", ["policy=baseline", "cache.name=belady"]),
        ("belady, no prefetch (adapmoe gating)", "adapmoe", ["policy=baseline", "cache.name=belady", *g]),
        (OFFLINE["topk"], "topk", ["policy=oracle"]),
        (OFFLINE["adapmoe"], "adapmoe", ["policy=oracle", *g]),
        ("ours: adapmoe_yield", "adapmoe", ["policy=adapmoe_yield", f"gating.T_miss={a.T * a.T_miss_factor}",
                                            f"gating.sensitivity={a.sensitivity}"]),
    ]


#: the arm that is the best offline schedule of each reference gating
OFFLINE = {"topk": "best offline schedule (top-k gating)", "adapmoe": "best offline schedule (adapmoe gating)"}


COLUMNS = ("tpot_ms", "speedup", "x_offline", "bound_ms", "x_bound", "single_expert_share",
           "experts_per_token_layer", "hit_rate", "prefetch_accuracy", "dL_est")


def run_paper(a: PaperArgs, progress: bool = True) -> list[dict[str, Any]]:
    base = [f"trace={a.trace}", f"hw={a.hw}", f"model={a.model}", f"cache.slots={a.slots}", f"seed={a.seed}",
            "bound=true"]
    rows = []
    arm_list = arms(a)
    from tqdm import tqdm

    for label, ref, args in tqdm(arm_list, desc="arms", disable=not progress):
        try:
            res = simulate(parse_run_config(base + args))
        except UserError as err:  # an arm that does not apply to this hardware (e.g. CPU placement)
            rows.append({"arm": label, "reference": ref, "args": " ".join(args), "error": str(err)})
            continue
        s = res.summary
        rows.append({"arm": label, "reference": ref, "args": " ".join(args), "tpot_ms": s["tpot_mean_s"] * 1e3,
                     "bound_ms": s["tpot_lower_bound_s"] * 1e3, "x_bound": s["bound_ratio"],
                     **{k: s[k] for k in COLUMNS[5:]}, "prefetch_modelled": s["prefetch_modelled"]})
    if "error" in rows[0]:  # the baseline did not run: there is nothing to compare with
        raise UserError(f"the baseline arm ({rows[0]['arm']}) cannot run here: {rows[0]['error']}")
    ref = rows[0]["tpot_ms"]
    offline = {r["reference"]: r["tpot_ms"] for r in rows if r["arm"] in OFFLINE.values() and "error" not in r}
    for r in rows:
        if "error" not in r:
            r["speedup"] = ref / r["tpot_ms"]
            r["x_offline"] = r["tpot_ms"] / offline[r["reference"]] if r["reference"] in offline else None
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| arm | TPOT (ms) | speedup | x best offline | lower bound (ms) | x bound | single-expert share "
            "| experts / (token, layer) | hit rate | prefetch accuracy | dL |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arm']} | n/a: {r['error']} |" + " |" * 9)
            continue
        pa = "-" if r["prefetch_accuracy"] is None else f"{r['prefetch_accuracy']:.3f}" + (
            "*" if r["prefetch_modelled"] else "")
        xo = "-" if r["x_offline"] is None else f"{r['x_offline']:.3f}"
        lines.append(f"| {r['arm']} | {r['tpot_ms']:.2f} | {r['speedup']:.3f} | {xo} | {r['bound_ms']:.2f} "
                     f"| {r['x_bound']:.3f} | {r['single_expert_share']:.3f} | {r['experts_per_token_layer']:.3f} "
                     f"| {r['hit_rate']:.3f} | {pa} | {r['dL_est']:.3g} |")
    return "\n".join(lines)


def gaps(rows: list[dict[str, Any]]) -> str:
    """One line per reference gating: the best offline schedule against its lower bound."""
    out = []
    for label in OFFLINE.values():
        r = next((x for x in rows if x["arm"] == label and "error" not in x), None)
        if r is not None:
            out.append(f"{label}: {r['tpot_ms']:.2f} ms, lower bound {r['bound_ms']:.2f} ms "
                       f"(the schedule is at most {r['x_bound']:.3f}x from the optimum)")
    return "\n".join(out)
