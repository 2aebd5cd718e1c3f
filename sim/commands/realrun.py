"""`python -m sim realrun trace=DIR model=PRESET policy=... device=cpu|cuda store=disk|host [layers=N]
[tokens=N] out=DIR [key=value ...]`: replay a trace with real tensors and real data movement.

Defaults (`python -m sim realrun` alone works): trace=traces/toy, replayed without `model=` as
mixtral-mini (float32 experts of 4.7 MB, Mixtral-8x7B's routing shape; `run` replays it as
mixtral-8x7b, whose 2-bit experts a real run cannot compute with; another trace without `model=` is
its own model, as in `run`), policy=mixtral_offloading, device=cpu, store=disk,
tokens=64 (the first prompt's prefill and 64 decode tokens; tokens=0: the whole trace, or
engine.max_tokens=N), all layers, hw=hwprofiles/local.yaml when `calibrate` wrote one (in the
working folder's hwprofiles/, else the bundled one), else jetson.yaml. On a 2-core CPU the default
run took 17-21 s (the first run writes the 1.2 GB disk store).

store=disk keeps one store per model shape in the user's cache folder (platformdirs:
~/.cache/moe-offload-sim/realrun-store on Linux) unless `store_dir=DIR`; it is written once,
announced on stderr (where, how many GB) before it is written, and reused by later runs.

A serving workload (`workload.kind=open|closed` and the `batch.*`, `memory.*`, `spec.*` keys of
`run`, docs/serving.md) runs the simulator's scheduler on the real machine: batched steps, each
expert of a step's union computed once over its tokens; open-loop requests arrive on the wall
clock; it writes `requests.parquet` and `steps.parquet` as `run` does. Cap request lengths with
`workload.max_prompt` / `workload.max_output` (`tokens=` caps the replay only).

With `model=DIR` (a Mixtral-architecture checkpoint folder) it runs the live model instead: the
real forward pass over held-out text with experts served from the offloaded store, and reports
perplexity under the gating policy (`sim/realrun/live.py`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sim.results.metrics import SUMMARY_KEYS

REAL_KEYS = ("realrun_device", "realrun_store", "page_cache_cold_s", "page_cache_warm_s",
             "page_cache_cold_again_s", "page_cache_not_a_page_cache_hit", "realrun_wall_s")


def main(argv: list[str]) -> int:
    from sim import atomic
    from sim.realrun.build import parse_realrun
    from sim.results.folder import default_out, summary_table

    cfg, opts = parse_realrun(argv)
    model_dir = bool(cfg.model) and Path(cfg.model).is_dir()  # "" (the trace's own model) is no folder
    live = opts.live or model_dir
    if live and not model_dir:
        from sim.errors import UserError
        from sim.paths import is_bare_name
        from sim.realrun.live import DEFAULT_MODEL

        if cfg.model and not is_bare_name(cfg.model):  # a path that does not exist is never swapped for the toy model
            raise UserError(f"model folder not found: {cfg.model}")

        if not DEFAULT_MODEL.is_dir():
            raise UserError(f"live=true needs model=DIR of a checkpoint (the toy model {DEFAULT_MODEL.name} is not built)")
        cfg.model = str(DEFAULT_MODEL)
    name = cfg.name or f"realrun-{cfg.policy}-{opts.device}-{opts.store}"
    out = Path(cfg.out) if cfg.out else default_out(name)
    t0 = time.perf_counter()
    if live:
        from sim.realrun.live import fill_live, live_run, print_live

        with atomic.new_dir(out, overwrite=cfg.overwrite, need_bytes=8e6,  # claimed before the run
                            replaces=("summary.json", "config.yaml")) as tmp:
            res = live_run(cfg, opts)
            fill_live(res, opts, tmp)
        print_live(res)
    else:
        from sim.realrun.run import fill_real_results, real_run

        with atomic.new_dir(out, overwrite=cfg.overwrite, need_bytes=16e6 if cfg.report else 8e6,
                            replaces=("summary.json", "config.yaml")) as tmp:  # claimed before the run
            res = real_run(cfg, opts)
            fill_real_results(res, opts, tmp, report=cfg.report, title=f"realrun {out.name}")
        s = res.summary
        wall = time.perf_counter() - t0
        if res.requests is not None:  # a serving workload
            from sim.serving.metrics import SERVING_SUMMARY_KEYS

            print(f"{name}: {s['requests']} requests ({cfg.workload.kind} loop), {s['steps']} steps, cache "
                  f"{s['cache_slots']} experts of {s['expert_bytes'] / 1e6:.1f} MB, measured in {wall:.1f} s")
            keys = list(SERVING_SUMMARY_KEYS) + ["link_utilization", "compute_utilization"]
        else:
            print(f"{name}: {s['tokens_decode']} decode tokens, cache {s['cache_slots']} experts of "
                  f"{s['expert_bytes'] / 1e6:.1f} MB, measured in {wall:.1f} s")
            keys = list(SUMMARY_KEYS)
        print(summary_table(s, keys + [k for k in REAL_KEYS if k in s]))
    print(f"results: {out}", file=sys.stderr)
    return 0
