"""The AdapMoE paper's experiment: AdapMoE's parts added one at a time, beside other policies.

`python -m sim paper trace=DIR hw=rtx4090.yaml` runs, on one trace, hardware and cache size:
mixtral_offloading (the baseline), + adaptive gating, + AdapMoE's pre-gating (staged, waited
for), + DP-sized caches (= `adapmoe`), `adapmoe` with the published DP inputs, `fiddler`,
`hobbit`, `oracle`, and our `adapmoe_yield`; and prints one markdown table.
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


def arms(a: PaperArgs) -> list[tuple[str, list[str]]]:
    g = ["gating.name=adapmoe", f"gating.T={a.T}", f"gating.sensitivity={a.sensitivity}"]
    adapmoe_pf = ["prefetch.wait=true", "prefetch.admit=on_use"]
    return [
        ("mixtral_offloading", ["policy=mixtral_offloading"]),
        ("+ adaptive gating", ["policy=mixtral_offloading", *g]),
        ("+ AdapMoE pre-gating", ["policy=mixtral_offloading", *g, *adapmoe_pf]),
        ("+ DP cache = adapmoe", ["policy=adapmoe", *g[1:], f"cache.fit={a.fit}"]),
        ("adapmoe (published DP inputs)", ["policy=adapmoe", *g[1:], "cache.fit=published"]),
        ("fiddler", ["policy=fiddler"]),
        ("hobbit", ["policy=hobbit", f"placement.sensitivity={a.sensitivity}"]),
        ("oracle (top-k gating)", ["policy=oracle"]),
        ("oracle (adapmoe gating)", ["policy=oracle", *g]),
        ("ours: adapmoe_yield", ["policy=adapmoe_yield", f"gating.T_miss={a.T * a.T_miss_factor}",
                                 f"gating.sensitivity={a.sensitivity}", f"cache.fit={a.fit}"]),
    ]


COLUMNS = ("tpot_ms", "speedup", "single_expert_share", "experts_per_token_layer", "hit_rate",
           "prefetch_accuracy", "dL_est")


def run_paper(a: PaperArgs, progress: bool = True) -> list[dict[str, Any]]:
    base = [f"trace={a.trace}", f"hw={a.hw}", f"model={a.model}", f"cache.slots={a.slots}", f"seed={a.seed}"]
    rows = []
    arm_list = arms(a)
    try:
        from tqdm import tqdm

        it = tqdm(arm_list, desc="arms", disable=not progress)
    except ImportError:  # pragma: no cover
        it = arm_list
    for label, args in it:
        try:
            res = simulate(parse_run_config(base + args))
        except UserError as err:  # an arm that does not apply to this hardware (e.g. CPU placement)
            rows.append({"arm": label, "args": " ".join(args), "error": str(err)})
            continue
        s = res.summary
        rows.append({"arm": label, "args": " ".join(args), "tpot_ms": s["tpot_mean_s"] * 1e3,
                     **{k: s[k] for k in COLUMNS[2:]}, "prefetch_modelled": s["prefetch_modelled"]})
    ref = rows[0]["tpot_ms"]
    for r in rows:
        if "error" not in r:
            r["speedup"] = ref / r["tpot_ms"]
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| arm | TPOT (ms) | speedup | single-expert share | experts / (token, layer) | hit rate "
            "| prefetch accuracy | dL |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arm']} | n/a: {r['error']} |" + " |" * 6)
            continue
        pa = "-" if r["prefetch_accuracy"] is None else f"{r['prefetch_accuracy']:.3f}" + (
            "*" if r["prefetch_modelled"] else "")
        lines.append(f"| {r['arm']} | {r['tpot_ms']:.2f} | {r['speedup']:.3f} | {r['single_expert_share']:.3f} "
                     f"| {r['experts_per_token_layer']:.3f} | {r['hit_rate']:.3f} | {pa} | {r['dL_est']:.3g} |")
    return "\n".join(lines)
