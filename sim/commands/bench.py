"""`python -m sim bench [trace=DIR] [hw=jetson.yaml] [model=mixtral-8x7b] [repeats=3]`, or
`python -m sim bench shape=deepseek-v3 [tokens=1000] [slots=4930] [policies=lru,lfu,belady,oracle]`.

Default: simulated (token, layer) decode steps per second of the engine (per-layer LRU + pregate,
no prefill, no timeline recording) and, in the same run, of the naive SimPy loop in
`sim/engine/naive.py` (one process per load), with their ratio. Last line: `steps_per_s=<n> ratio=<r>`.

`shape=PRESET`: scale. A seeded synthetic trace of the preset's shape (`tokens` decode tokens,
routing with some temporal locality), `slots` cache slots, and each of `policies` run on it:
time per step and its ratio to `lru`'s, loads per step, and the memory a run holds: the peak
Python allocation of the run per load and per step (tracemalloc, one extra run) and the process's
peak resident set (all runs, the trace included). Last line: `<policy>_ratio=<r> ...
bytes_per_load=<n> peak_rss_mb=<n>`. Single-threaded: this measures one core. On a profile whose
experts live on storage (`hw=desktop-nvme.yaml`) the run is tiered (docs/tiers.md): a host cache of
`host_cache_bytes` (default: the profile's) in front of the SSD.

`serving=N`: a serving run (docs/serving.md): N requests arriving open-loop at `rate` requests/s
on the bundled trace (`trace=`), the scheduler's defaults (batches of up to 16 requests),
`mixtral_offloading` with `slots` cache slots (default 64) on `hw` (default for this mode:
rtx4090.yaml), timed from the engine's set-up to the summary (no files written); the fastest of
`repeats`. Last line: `serving_s=<s> requests_per_s=<n> steps_per_s=<n>`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sim.args import parse_args
from sim.config import DEFAULT_TRACE, default_staging


@dataclass
class BenchArgs:
    trace: str = DEFAULT_TRACE  # trace folder, or a bundled name (toy)
    hw: str = "jetson.yaml"  # hardware profile: a YAML file, or a bundled name
    model: str = "mixtral-8x7b"  # model preset (python -m sim list)
    repeats: int = 3  # runs of each engine; the fastest counts
    tokens: int = 0  # decode tokens to simulate (0: all; with shape=, the trace's length, default 1000)
    shape: str = ""  # a model preset: bench the policies' scale on a synthetic trace of its shape
    slots: int = 0  # with shape=: cache slots (0: 4930 for deepseek-v3, else 10% of the experts)
    policies: str = "lru,lfu,belady,oracle"  # with shape=: the cache policies (oracle: its prefetch + belady)
    locality: float = 0.5  # with shape=: temporal reuse of the synthetic routing, in [0, 1)
    host_cache_bytes: float | None = None  # with shape= on a profile with experts on storage: the host cache (docs/tiers.md; unset: the profile's default)
    serving: int = 0  # bench a serving run of this many requests (open loop) instead
    rate: float = 1.0  # with serving=: arrivals per second


def main(argv: list[str]) -> int:
    from sim.config import parse_run_config
    from sim.engine.naive import naive_decode
    from sim.runner import build_engine, load_trace

    args = parse_args(BenchArgs, argv)
    if args.shape:
        return bench_shape(args)
    if args.serving:
        return bench_serving(args, hw_given=any(a.startswith("hw=") for a in argv))
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


POLICY_ARGS = {
    "lru": ["cache.name=lru", "cache.scope=global"],
    "lfu": ["cache.name=lfu", "cache.scope=global"],
    "belady": ["cache.name=belady"],
    "oracle": ["cache.name=belady", "prefetch.name=oracle"],
}


def bench_serving(args: BenchArgs, hw_given: bool) -> int:
    """The time of a serving run of `args.serving` open-loop requests, set-up to summary."""
    from sim.config import parse_run_config
    from sim.runner import load_trace, simulate

    hw = args.hw if hw_given else "rtx4090.yaml"
    trace = load_trace(args.trace)
    cfg = parse_run_config([f"trace={args.trace}", f"hw={hw}", f"model={args.model}", "policy=mixtral_offloading",
                            f"cache.slots={args.slots or 64}", "workload.kind=open", f"workload.rate={args.rate}",
                            f"workload.requests={args.serving}"])
    best = float("inf")
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        res = simulate(cfg, trace)
        best = min(best, time.perf_counter() - t0)
    s = res.summary
    steps = res.steps.height
    print(f"serving: {args.serving} requests (open loop, {args.rate:g}/s) on {args.trace}, hw {hw}, "
          f"{args.slots or 64} slots: {steps} steps, batch {s['batch_size_mean']:.2f} requests on average, "
          f"union {s['union_experts_per_layer_mean']:.2f} experts per layer")
    print(f"run: {best:.2f} s (fastest of {max(1, args.repeats)}; set-up, run and summary, no files) -> "
          f"{args.serving / best:.1f} requests/s, {steps / best:.0f} steps/s of the simulator")
    print(f"serving_s={best:.2f} requests_per_s={args.serving / best:.1f} steps_per_s={steps / best:.0f}")
    return 0


def bench_shape(args: BenchArgs) -> int:
    """The policies' cost per step on a synthetic trace of a preset's shape, and a run's memory."""
    import gc
    import tracemalloc

    from sim.config import parse_run_config
    from sim.errors import UserError
    from sim.machine.models import load_preset
    from sim.runner import build_engine
    from sim.trace.synthetic import routing_trace

    preset = load_preset(args.shape)
    names = [p for p in args.policies.split(",") if p]
    unknown = [p for p in names if p not in POLICY_ARGS]
    if unknown or not names:
        raise UserError(f"policies={args.policies!r}: choose from {', '.join(POLICY_ARGS)}")
    if not 0.0 <= args.locality < 1.0:
        raise UserError(f"locality must be in [0, 1), got {args.locality}")
    tokens = args.tokens or 1000
    n_experts = preset.layers * preset.experts
    slots = args.slots or (4930 if preset.name == "deepseek-v3" else max(preset.layers * preset.top_k, n_experts // 10))
    trace = routing_trace(np.random.default_rng(0), tokens=tokens, layers=preset.layers, experts=preset.experts,
                          top_k=preset.top_k, locality=args.locality, name=f"synthetic-{preset.name}")
    steps = tokens * preset.layers
    print(f"shape {preset.name}: {preset.layers} layers x {preset.experts} experts, top-{preset.top_k}; "
          f"{tokens} tokens ({steps} steps), {slots} slots, hw {args.hw}")
    if args.host_cache_bytes is not None:
        print(f"host cache: host_cache.bytes={args.host_cache_bytes:.0f}")

    def config(name: str, max_tokens: int = 0):
        return parse_run_config([f"hw={args.hw}", f"model={args.shape}", "gating.name=topk", "prefetch.name=none",
                                 *POLICY_ARGS[name], f"cache.slots={slots}", "engine.prefill=false",
                                 f"engine.max_tokens={max_tokens}",
                                 "engine.timeline_tokens=0", f"engine.staging_buffers={default_staging(preset.top_k)}",
                                 *([f"host_cache.bytes={args.host_cache_bytes}"] if args.host_cache_bytes is not None else [])])

    times: dict[str, float] = {}  # best set-up + run (a user waits for both)
    for name in names:
        best, best_run, loads = float("inf"), float("inf"), 0
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            engine, _info = build_engine(config(name), trace)  # the policies' set-up: plans, schedules
            t1 = time.perf_counter()
            engine.run()
            t2 = time.perf_counter()
            best, best_run = min(best, t2 - t0), min(best_run, t2 - t1)
            loads = len(engine.rec.loads)
            tpot = float(engine.rec.tokens_frame()["latency_s"].mean())
        times[name] = best
        print(f"{name:>8}: {best / steps * 1e6:8.2f} us/step ({best_run / steps * 1e6:.2f} of it the run, the rest "
              f"set-up)  {loads / steps:6.2f} loads/step  (simulated TPOT {tpot * 1e3:.3f} ms)")
    ref = times.get("lru", next(iter(times.values())))
    ratios = {n: t / ref for n, t in times.items()}
    print("per step (set-up + run), relative to lru: " + "  ".join(f"{n} {r:.2f}x" for n, r in ratios.items()))
    # memory: the process's peak resident set during one run (the trace and the set-up included),
    # then the Python allocations a run holds at its peak, per load (tracemalloc, on a shorter run)
    del engine
    gc.collect()
    engine, _info = build_engine(config(names[0]), trace)
    exact = _reset_peak_rss()
    engine.run()
    rss_mb = _peak_rss_mb()
    del engine
    gc.collect()
    sub = min(tokens, 2000)
    engine, _info = build_engine(config(names[0], sub), trace)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    engine.run()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    loads = max(1, len(engine.rec.loads))
    print(f"memory ({names[0]}): peak resident set during a {tokens}-token run {rss_mb:.0f} MB "
          f"({'this run' if exact else 'the whole process: the peak could not be reset'}, the trace included); "
          f"the run's own allocations at their peak {peak / loads:.0f} bytes per load "
          f"({sub} tokens, {loads} loads, tracemalloc)")
    print(" ".join(f"{n}_ratio={r:.2f}" for n, r in ratios.items())
          + f" bytes_per_load={peak / loads:.0f} peak_rss_mb={rss_mb:.0f}")
    return 0


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-resident-set mark of this process (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """The peak resident set (MB) since the last reset: VmHWM (Linux), else getrusage's maximum."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
