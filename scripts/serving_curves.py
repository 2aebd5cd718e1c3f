"""Latency against throughput under continuous batching, per policy and profile (docs/serving.md).

    python scripts/serving_curves.py [requests=48] [out=serving_curves.json]

Runs open-loop Poisson workloads on the bundled trace at several rates for each (profile, policy)
and prints one row per point: offered rate, throughput, TTFT and TPOT p50/p99, mean batch, union
of experts per layer, bytes loaded per output token. Seeded: the same command gives the same table.
"""

from __future__ import annotations

import json
import sys
import time

from sim.config import parse_run_config
from sim.runner import simulate

CASES = {
    "rtx4090.yaml": (["cache.slots=64"], [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]),
    "jetson.yaml": ([], [0.005, 0.01, 0.02, 0.04]),
}
POLICIES = ["mixtral_offloading", "adapmoe", "adapmoe_yield", "fiddler"]


def main(argv: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in argv)
    n = int(opts.get("requests", 48))
    rows = []
    for hw, (extra, rates) in CASES.items():
        for policy in POLICIES:
            if policy == "fiddler" and hw == "jetson.yaml":
                continue  # experts live on NVMe there: no CPU placement
            for rate in rates:
                t0 = time.perf_counter()
                cfg = parse_run_config([f"hw={hw}", f"policy={policy}", *extra, "report=false", "workload.kind=open",
                                        f"workload.rate={rate}", f"workload.requests={n}", "batch.max_requests=16"])
                s = simulate(cfg).summary
                row = {"hw": hw, "policy": policy, "rate": rate, "wall_s": time.perf_counter() - t0,
                       **{k: s[k] for k in ("throughput_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
                                            "tpot_p99_s", "batch_size_mean", "union_experts_per_layer_mean",
                                            "bytes_loaded_per_output_token", "preemptions")}}
                rows.append(row)
                print(f"{hw:13s} {policy:19s} rate {rate:6.3f}/s  thr {row['throughput_tokens_per_s']:7.3f} tok/s  "
                      f"TTFT p50 {row['ttft_p50_s']:8.2f} p99 {row['ttft_p99_s']:8.2f} s  TPOT p50 "
                      f"{row['tpot_p50_s'] * 1e3:8.1f} p99 {row['tpot_p99_s'] * 1e3:8.1f} ms  batch "
                      f"{row['batch_size_mean']:5.2f}  union {row['union_experts_per_layer_mean']:4.2f}  "
                      f"{row['bytes_loaded_per_output_token'] / 1e6:6.0f} MB/tok  ({row['wall_s']:.1f} s)", flush=True)
    if "out" in opts:
        with open(opts["out"], "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
