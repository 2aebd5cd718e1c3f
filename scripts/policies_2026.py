"""Every policy family of 2025-2026 on the same routing: the numbers of docs/policies-2026.md.

    PYTHONPATH=. python scripts/policies_2026.py he=HE_TRACE [toy=toy] [jobs=2] [out=policies_2026.json]
    PYTHONPATH=. python scripts/policies_2026.py tables=policies_2026.json     # the markdown tables

Traces are split in time (`python -m sim split`, by position: every sequence's first half fits,
its second half tests; the toy trace by sequence), the learned and profiled parts are fitted on
the fit half and every arm is run on the test half only, so a learned policy never sees what it is
scored on. For every (trace, profile, cache size) it runs each arm with `bound=true` (the proven
lower bound for the arm's own gating and placement) and the best offline schedule of the
`oracle` preset (top-k gating); it prints one table per (trace, profile) and writes all rows as
JSON. Synthetic Mixtral-shaped traces of three localities (`sim.trace.synthetic.random_trace`:
each token's router logits mix `locality` of the previous token's; seeded) answer static vs
dynamic beside the real one.
Deterministic: the same command gives the same table.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HW = ["rtx4090.yaml", "jetson.yaml"]
SLOTS = [32, 64, 128]
TOPK, NONE, LOAD = {"gating.name": "topk"}, {"prefetch.name": "none"}, {"placement.name": "load"}
LFU_L = {"cache.name": "lfu", "cache.scope": "layer"}


def arms(fit: str, sens: dict) -> list[tuple[str, str, dict]]:
    """(family, label, config keys) of every arm; `fit` the fit half, `sens` the sensitivity key."""
    base = {**TOPK, **NONE, **LOAD}
    cache = [
        ("cache", "lru (per layer)", {**base, "cache.name": "lru", "cache.scope": "layer"}),
        ("cache", "lru (global)", {**base, "cache.name": "lru", "cache.scope": "global"}),
        ("cache", "lfu (per layer)", {**base, **LFU_L}),
        ("cache", "lfu (global)", {**base, "cache.name": "lfu", "cache.scope": "global"}),
        ("cache", "arc (per layer; Fate)", {**base, "cache.name": "arc"}),
        ("cache", "mrs (HybriMoE)", {**base, "cache.name": "mrs"}),
        ("cache", "learned_score (FlashMoE-style)", {**base, "cache.name": "learned_score", "cache.scope": "layer",
                                                      "cache.fit": fit}),
        ("cache", "fixed_point_sizes (lfu)", {**base, "cache.name": "fixed_point_sizes", "cache.inner": "lfu",
                                               "cache.fit": fit}),
        ("cache", "static hot set (fit half)", {**base, "cache.name": "static", "cache.profile": fit}),
        ("cache", "partial_experts (MoEpic)", {**base, "cache.name": "lru", "cache.scope": "layer",
                                                "placement.name": "partial_experts", "placement.fit": fit}),
        ("cache", "belady (exact MIN, offline)", {**base, "cache.name": "belady"}),
    ]
    pre = {**TOPK, **LOAD, **LFU_L}
    prefetch = [
        ("prefetch", "pregate (mixtral-offloading)", {**pre, "prefetch.name": "pregate"}),
        ("prefetch", "history (MoE-Infinity-like)", {**pre, "prefetch.name": "history"}),
        ("prefetch", "learned (ProMoE/DuoServe)", {**pre, "prefetch.name": "learned", "prefetch.fit": fit}),
        ("prefetch", "gain_ranked (HybriMoE)", {**pre, "prefetch.name": "gain_ranked"}),
        ("prefetch", "phased (DuoServe)", {**pre, "prefetch.name": "phased", "prefetch.decode": "learned",
                                           "prefetch.fit": fit}),
    ]
    gp = {**NONE, **LFU_L}
    psens = {k.replace("gating", "placement"): v for k, v in sens.items()}
    gating = [
        ("gating", "substitute", {**gp, **LOAD, "gating.name": "substitute", **sens}),
        ("gating", "buddy (BuddyMoE)", {**gp, **LOAD, "gating.name": "buddy", **sens}),
        ("placement", "fiddler (cpu_on_miss, static)", {**TOPK, **NONE, "cache.name": "static", "cache.profile": fit,
                                                        "placement.name": "cpu_on_miss"}),
        ("placement", "cost_based", {**TOPK, **gp, "placement.name": "cost_based"}),
        ("placement", "hybrid_split (HybriMoE)", {**TOPK, **gp, "placement.name": "hybrid_split"}),
        ("placement", "low_precision_on_miss (HOBBIT)", {**TOPK, **gp, "placement.name": "low_precision_on_miss",
                                                          "placement.low_bits": 1.0, **psens}),
        ("placement", "popularity_precision (Fate)", {**TOPK, **gp, "placement.name": "popularity_precision",
                                                       "placement.low_bits": 1.0, "placement.fit": fit, **psens}),
    ]
    ours = [
        ("combined", "adapmoe (AdapMoE as released)", {"policy": "adapmoe", **sens}),
        ("combined", "adapmoe_yield (ours, before)", {"policy": "adapmoe_yield", **sens}),
        ("combined", "hybrid_yield (ours, 2026)", {"policy": "hybrid_yield", **sens}),
    ]
    return cache + prefetch + gating + ours


#: static vs dynamic under batching: closed loops of N users on the toy test half (its 8 prompts of 64
#: tokens, 128 decode each; 2N requests drawn with a seeded generator), per cache policy and size
BATCH_USERS = [1, 4, 8]
BATCH_SLOTS = [64, 128]


def batch_arms(fit: str) -> list[tuple[str, str, dict]]:
    base = {**TOPK, **NONE, **LOAD}
    return [
        ("batch", "static hot set (fit half)", {**base, "cache.name": "static", "cache.profile": fit}),
        ("batch", "lfu (per layer)", {**base, **LFU_L}),
        ("batch", "lru (global)", {**base, "cache.name": "lru", "cache.scope": "global"}),
        ("batch", "arc (per layer)", {**base, "cache.name": "arc"}),
    ]


def one_batch(job: tuple) -> dict:
    trace, hw, slots, users, label, keys = job
    import sim

    row = {"trace": trace, "hw": hw, "slots": slots, "users": users, "family": "batch", "arm": label}
    s = sim.run(hw=hw, trace=trace, policy="baseline", **{"cache.slots": slots, "workload.kind": "closed",
                                                          "workload.users": users, "workload.requests": 2 * users},
                **keys).summary
    row.update({k: s.get(k) for k in ("tpot_p50_s", "throughput_tokens_per_s", "bytes_loaded_per_output_token",
                                      "union_experts_per_layer_mean", "batch_size_mean")})
    return row


def one(job: tuple) -> dict:
    trace, hw, slots, family, label, keys = job
    import sim

    t0 = time.perf_counter()
    row = {"trace": trace, "hw": hw, "slots": slots, "family": family, "arm": label}
    try:
        policy = keys.get("policy", "baseline")
        rest = {k: v for k, v in keys.items() if k != "policy"}
        s = sim.run(hw=hw, trace=trace, policy=policy, bound=True, **{"cache.slots": slots}, **rest).summary
        row.update({k: s.get(k) for k in ("tpot_mean_s", "hit_rate", "dL_est", "tpot_lower_bound_s", "bound_ratio",
                                          "prefetch_used", "prefetch_issued", "prefetch_late", "cache_slots")})
    except Exception as err:  # noqa: BLE001 - a refused combination is a row saying why
        row["error"] = " ".join(str(err).split())[:200]
    row["wall_s"] = time.perf_counter() - t0
    return row


def tables(rows: list[dict]) -> str:
    """One markdown table per (trace, profile): an arm per row; per cache size TPOT (ms), hit rate,
    dL, TPOT / the best offline schedule (top-k) and TPOT / the arm's lower bound."""
    out = []
    batch = [r for r in rows if r["family"] == "batch"]
    loc = [r for r in rows if r["family"] == "locality"]
    rows = [r for r in rows if r["family"] not in ("batch", "locality")]
    if loc:
        out += ["### Locality of each test half (`python -m sim stats`: SCH per segment length m at c = 4 experts "
                "per layer, shuffled in brackets; the Belady ceiling of the hit rate per global cache size)", "",
                "| trace | reuse | SRP m=16 | SCH m=4 | SCH m=16 | SCH m=64 | " +
                " | ".join(f"ceiling {c}" for c in SLOTS) + " |", "|---|" + "---|" * (5 + len(SLOTS))]
        for r in loc:
            sch = " | ".join(f"{r[f'sch_{m}']:.3f} ({r[f'sch_{m}_shuffled']:.3f})" for m in (4, 16, 64))
            out.append(f"| {r['trace']} | {r['reuse']:.3f} | {r['srp_16']:.3f} | {sch} | "
                       + " | ".join(f"{r[f'ceiling_{c}']:.3f}" for c in SLOTS) + " |")
        out.append("")
    keys = dict.fromkeys((r["trace"], r["hw"]) for r in rows)
    for trace, hw in keys:
        sel = [r for r in rows if r["trace"] == trace and r["hw"] == hw]
        slots = sorted({r["slots"] for r in sel})
        best = {r["slots"]: r.get("tpot_mean_s") for r in sel if r["family"] == "offline"}
        out += [f"### {trace}, `hw={hw}`", "",
                "| family | arm | " + " | ".join(f"{c} slots: TPOT ms / hit / dL / x offline / x bound" for c in slots)
                + " |", "|---|---|" + "---|" * len(slots)]
        for arm in dict.fromkeys(r["arm"] for r in sel):
            cells, family = [], ""
            for c in slots:
                r = next((x for x in sel if x["arm"] == arm and x["slots"] == c), None)
                family = r["family"] if r else family
                if r is None or r.get("error"):
                    cells.append("n/a" + (f": {r['error'][:70]}" if r and r.get("error") else ""))
                    continue
                t = r["tpot_mean_s"]
                off = f"{t / best[c]:.2f}" if best.get(c) else "-"
                bnd = f"{r['bound_ratio']:.2f}" if r.get("bound_ratio") else "-"
                cells.append(f"{t * 1e3:.1f} / {r['hit_rate']:.3f} / {r['dL_est']:.3g} / {off} / {bnd}")
            out.append(f"| {family} | {arm} | " + " | ".join(cells) + " |")
        out.append("")
    if batch:
        out += ["### Static vs dynamic under batching (toy test half, `hw=rtx4090.yaml`, closed loop of N users)", "",
                "| cache | slots | " + " | ".join(f"{u} users: TPOT p50 ms / tokens/s / MB loaded per token / "
                                                  f"union of experts per layer" for u in BATCH_USERS)
                + " |", "|---|---|" + "---|" * len(BATCH_USERS)]
        for arm in dict.fromkeys(r["arm"] for r in batch):
            for c in BATCH_SLOTS:
                cells = []
                for u in BATCH_USERS:
                    r = next(x for x in batch if x["arm"] == arm and x["slots"] == c and x["users"] == u)
                    cells.append(f"{r['tpot_p50_s'] * 1e3:.1f} / {r['throughput_tokens_per_s']:.2f} / "
                                 f"{r['bytes_loaded_per_output_token'] / 1e6:.0f} / "
                                 f"{r['union_experts_per_layer_mean']:.2f}")
                out.append(f"| {arm} | {c} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in argv)
    if "tables" in opts:
        with open(opts["tables"]) as f:
            print(tables(json.load(f)))
        return 0
    import sim  # noqa: F401
    from sim.runner import load_trace
    from sim.trace.format import write_trace
    from sim.trace.split import split_trace
    from sim.trace.synthetic import random_trace

    work = Path(tempfile.mkdtemp(prefix="policies2026-"))
    traces = {}  # label -> (test dir, fit dir, sensitivity keys)
    if opts.get("he"):
        fit, test = split_trace(load_trace(opts["he"]), 0.5, "position")
        traces["mixtral-humaneval"] = (write_trace(test, work / "he_test"), write_trace(fit, work / "he_fit"),
                                       {"gating.sensitivity": "published"})
    fit, test = split_trace(load_trace(opts.get("toy", "toy")), 0.5, "sequence")
    traces["toy"] = (write_trace(test, work / "toy_test"), write_trace(fit, work / "toy_fit"), {})
    for loc in (0.0, 0.6, 0.9):  # synthetic, Mixtral-8x7B-shaped: 8 sequences of 128 decode tokens
        tr = random_trace(np.random.default_rng(7), tokens=128, layers=32, experts=8, top_k=2, sequences=8,
                          locality=loc, name="mixtral-8x7b")
        fit, test = split_trace(tr, 0.5, "position")
        traces[f"synthetic-locality-{loc:g}"] = (write_trace(test, work / f"syn{loc}_test"),
                                                 write_trace(fit, work / f"syn{loc}_fit"),
                                                 {"gating.sensitivity": "published"})
    jobs = []
    for test, fit, sens in traces.values():
        for hw in HW:
            for slots in SLOTS:
                jobs.append((str(test), hw, slots, "offline", "oracle: best offline schedule (top-k)",
                             {"policy": "oracle"}))
                for family, arm, keys in arms(str(fit), sens):
                    jobs.append((str(test), hw, slots, family, arm, keys))
    names = {str(v[0]): k for k, v in traces.items()}
    rows = []
    n = int(opts.get("jobs", 2))
    spawn = multiprocessing.get_context("spawn")  # polars' thread pool does not survive a fork
    with ProcessPoolExecutor(n, mp_context=spawn) as pool:
        for i, row in enumerate(pool.map(one, jobs, chunksize=4)):
            row["trace"] = names[row["trace"]]
            rows.append(row)
            if i % 25 == 0:
                print(f"{i + 1}/{len(jobs)} {row['trace']} {row['hw']} {row['slots']} {row['arm']}", file=sys.stderr,
                      flush=True)
    from sim.trace.stats import summarize

    for label, (test, _fit, _s) in traces.items():  # what `python -m sim stats` says of each test half
        st = summarize(load_trace(str(test)), segments=[4, 16, 64], slots=SLOTS)
        loc, ceil = st["locality"], st["belady_ceiling"]["by_slots"]
        row = {"trace": label, "family": "locality", "reuse": st["reuse"]["mean"],
               **{f"srp_{m}": loc["srp"][str(m)]["mean"] for m in (4, 16, 64)},
               **{f"sch_{m}": loc["sch"][str(m)]["mean"] for m in (4, 16, 64)},
               **{f"sch_{m}_shuffled": loc["sch"][str(m)]["shuffled_mean"] for m in (4, 16, 64)},
               **{f"ceiling_{c}": ceil[str(c)]["mean"] for c in SLOTS}}
        rows.append(row)
    toy_test, toy_fit, _ = traces["toy"]
    bjobs = [(str(toy_test), "rtx4090.yaml", c, u, arm, keys) for c in BATCH_SLOTS for u in BATCH_USERS
             for _f, arm, keys in batch_arms(str(toy_fit))]
    with ProcessPoolExecutor(n, mp_context=spawn) as pool:
        for row in pool.map(one_batch, bjobs):
            row["trace"] = "toy"
            rows.append(row)
    out = opts.get("out", "policies_2026.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
