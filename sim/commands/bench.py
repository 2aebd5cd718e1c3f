"""`python -m sim bench [trace=DIR] [hw=jetson.yaml] [model=mixtral-8x7b] [repeats=3]`.

Simulated (token, layer) decode steps per second of the engine (per-layer LRU + pregate, no
prefill, no timeline recording) and, in the same run, of the naive SimPy loop in `sim/engine/naive.py`
(one process per load), with their ratio. Single-threaded: this measures one core. Last line:
`steps_per_s=<n> ratio=<r>`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sim.args import parse_args
from sim.config import DEFAULT_TRACE


@dataclass
class BenchArgs:
    trace: str = DEFAULT_TRACE
    hw: str = "jetson.yaml"
    model: str = "mixtral-8x7b"
    repeats: int = 3
    tokens: int = 0  # decode tokens to simulate (0: all)


def main(argv: list[str]) -> int:
    from sim.config import parse_run_config
    from sim.engine.naive import naive_decode
    from sim.runner import build_engine, load_trace

    args = parse_args(BenchArgs, argv)
    trace = load_trace(args.trace)
    cfg = parse_run_config([f"hw={args.hw}", f"model={args.model}", "policy=mixtral_offloading",
                            "engine.prefill=false", "engine.timeline_tokens=0", f"engine.max_tokens={args.tokens}"])
    best = float("inf")
    for _ in range(max(1, args.repeats)):
        engine, info = build_engine(cfg, trace)
        t0 = time.perf_counter()
        engine.run()
        best = min(best, time.perf_counter() - t0)
        steps = len(engine.rec.tokens["seq"]) * engine.L
        loads = len(engine.rec.loads)
    sizes = engine.cache_policy.sizes
    naive_best = float("inf")
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        lat = naive_decode(trace, engine.cost, sizes, engine.link.channels, max_tokens=args.tokens)
        naive_best = min(naive_best, time.perf_counter() - t0)
    lat_engine = engine.rec.tokens_frame()["latency_s"].to_numpy()
    tpot_engine, tpot_naive = float(lat_engine.mean()), sum(lat) / len(lat)
    gap = float(np.max(np.abs(lat_engine - np.asarray(lat)) / np.asarray(lat))) if lat else 0.0
    sps, naive_sps = steps / best, steps / naive_best
    print(f"trace {args.trace}: {steps} decode steps ({steps // engine.L} tokens x {engine.L} layers), "
          f"{loads / steps:.2f} loads per step, cache {info['cache_slots']} slots, hw {args.hw}")
    print(f"engine: {best:.3f} s  -> {sps:,.0f} steps/s   (simulated TPOT {tpot_engine * 1e3:.3f} ms)")
    print(f"naive:  {naive_best:.3f} s  -> {naive_sps:,.0f} steps/s   (simulated TPOT {tpot_naive * 1e3:.3f} ms)")
    print(f"same timeline: largest per-token latency difference {gap:.1e} (relative)")
    print(f"steps_per_s={sps:.0f} ratio={sps / naive_sps:.2f}")
    return 0
