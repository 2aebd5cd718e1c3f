"""Record the summary of many configurations, to check that a refactor keeps the numbers.

    python scripts/record_summaries.py out=before.json [he=PATH_TO_IMPORTED_TRACE] [jobs=2]
    python scripts/record_summaries.py compare=before.json,after.json

The grid: every policy preset x {jetson, rtx4090, a100} x two cache sizes x {bundled trace, and
an imported trace if `he=` names one} x {pipelining off, on} (prefill on), plus each preset on the
bundled trace without prefill, plus serving runs (`SERVING`: open and closed loops, chunked
prefill, a shared KV cache, speculative verification) of each preset on the bundled trace. A preset that does not apply to a profile (CPU placement on a
profile whose experts live on storage) is recorded as its error message. `compare` prints every
configuration whose summary differs, key by key.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor

PRESETS = ["baseline", "lfu", "mixtral_offloading", "adapmoe", "adapmoe_yield", "fiddler", "hobbit", "oracle"]
PROFILES = ["jetson.yaml", "rtx4090.yaml", "a100.yaml"]
SLOTS = [64, 160]
SERVING = [  # serving workloads (docs/serving.md), each run with every preset on the bundled trace
    ["workload.kind=open", "workload.rate=2", "workload.requests=24", "hw=rtx4090.yaml", "cache.slots=64"],
    ["workload.kind=closed", "workload.users=4", "workload.requests=16", "hw=jetson.yaml", "cache.slots=64",
     "batch.prefill_chunk=16"],
    ["workload.kind=closed", "workload.users=8", "workload.requests=16", "hw=a100.yaml", "cache.slots=64",
     "memory.kv=shared", "engine.pipelining=true"],
    ["workload.kind=closed", "workload.users=3", "workload.requests=9", "hw=rtx4090.yaml", "cache.slots=64",
     "spec.k=2", "spec.acceptance=0.7"],
]


def grid(he: str | None) -> list[list[str]]:
    out = []
    traces = ["traces/toy"] + ([he] if he else [])
    for tr in traces:
        sens = "gating.sensitivity=trace" if tr == "traces/toy" else "gating.sensitivity=published"
        for p in PRESETS:
            extra = [sens] if p in ("adapmoe", "adapmoe_yield") else []
            if p == "hobbit":
                extra = [sens.replace("gating", "placement")]
            for hw in PROFILES:
                for s in SLOTS:
                    for pipe in ("false", "true"):
                        out.append([f"trace={tr}", f"hw={hw}", f"policy={p}", f"cache.slots={s}",
                                    f"engine.pipelining={pipe}", *extra])
            out.append([f"trace={tr}", "hw=rtx4090.yaml", f"policy={p}", "cache.slots=96",
                        "engine.prefill=false", *extra])
    for p in PRESETS:
        if p == "oracle":  # reads the replay's future: refused by a serving run
            continue
        extra = ["gating.sensitivity=trace"] if p in ("adapmoe", "adapmoe_yield") else []
        if p == "hobbit":
            extra = ["placement.sensitivity=trace"]
        for wl in SERVING:
            out.append(["trace=traces/toy", f"policy={p}", *wl, *extra])
    return out


def one(args: list[str]) -> tuple[str, dict]:
    from sim.config import parse_run_config
    from sim.errors import UserError
    from sim.runner import simulate

    try:
        s = simulate(parse_run_config(args)).summary
    except UserError as err:
        s = {"error": str(err)}
    return " ".join(args), s


def main(argv: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in argv)
    if "compare" in opts:
        a_path, b_path = opts["compare"].split(",")
        a, b = json.load(open(a_path)), json.load(open(b_path))
        diffs = 0
        for key in sorted(set(a) | set(b)):
            sa, sb = a.get(key), b.get(key)
            if sa == sb:
                continue
            diffs += 1
            print(f"* {key}")
            if sa is None or sb is None:
                print("    only in", a_path if sb is None else b_path)
                continue
            for k in sorted(set(sa) | set(sb)):
                if sa.get(k) != sb.get(k):
                    print(f"    {k}: {sa.get(k)!r} -> {sb.get(k)!r}")
        print(f"{len(set(a) | set(b))} configurations, {diffs} differ")
        return 1 if diffs else 0
    cfgs = grid(opts.get("he"))
    with ProcessPoolExecutor(int(opts.get("jobs", 2))) as pool:
        results = dict(pool.map(one, cfgs, chunksize=4))
    with open(opts["out"], "w") as fh:
        json.dump(results, fh, indent=1, sort_keys=True)
    print(f"{len(results)} configurations -> {opts['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
