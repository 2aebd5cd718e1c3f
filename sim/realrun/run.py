"""`realrun` on a trace: random weights of the preset's shapes, real copies, real compute.

`real_run(cfg, opts)` returns a `sim.runner.RunResult` with the simulator's frames and summary
keys (plus `realrun_*` facts: device, store, the page-cache check), so `run` and `realrun` results
folders read the same way. A serving workload (`workload.kind=open|closed`, docs/serving.md) runs
the simulator's own scheduler and `sim.serving.serve.Serving` loop on the real machine: each
batched step computes each expert of the batch's union once over its tokens (a real batched
SwiGLU), attention's stand-in over each request's context; open-loop arrivals come on the wall
clock (the machine idles until the next one), a draft model's `spec.draft_s` is waited out.

A tiered run (`store=disk` on a profile whose hierarchy puts a host cache in front of storage:
docs/tiers.md; `host_cache.slots=0` turns it off) reads experts from the disk into host buffers
and copies them from there into device slots (`sim/realrun/tiers.py`), with the simulator's
per-tier figures in its summary and events. Refused in it (one line naming the key): `store=host`,
low-precision copies (`placement.name=low_precision_on_miss`), and `channels=` other than the
profile's `host_to_device` channels (each hop has its profile's channels).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sim import atomic
from sim.config import RunConfig
from sim.engine.tiers import TierLink
from sim.errors import UserError
from sim.machine.hardware import HardwareProfile, load_profile
from sim.realrun.backend import Backend, check_memory, dtype_for
from sim.realrun.build import RealOptions, preset_of, store_folder, tier_for, with_layers
from sim.realrun.compute import CpuWorker, RandomKernels, SlotPool
from sim.realrun.machine import RealMachine
from sim.realrun.store import DiskStore, HostStore, Layout, open_disk_store, random_fill
from sim.results.metrics import summarize
from sim.runner import RunResult, build_engine, load_trace
from sim.trace.format import Trace


def synthetic_layout(preset) -> Layout:
    dtype = dtype_for(preset.bits)
    if preset.group_size or preset.expert_bias:
        raise UserError(f"realrun needs plain float experts; preset {preset.name!r} has quantisation groups "
                        "or biases (use quant.group_size=0, or model=mixtral-mini)")
    if preset.attn_bits != preset.bits:
        raise UserError(f"realrun computes everything in one float type: the preset's attn_bits "
                        f"({preset.attn_bits:g}) must equal its bits ({preset.bits:g})")
    H, W = preset.hidden, preset.expert_width
    names = {32: "float32", 16: "bfloat16"}
    layout = Layout(preset.layers, preset.experts, ((W, H), (W, H), (H, W)), names[int(preset.bits)])
    assert layout.expert_bytes == preset.expert_bytes and dtype == layout.torch_dtype
    return layout


def store_tag(preset, layout: Layout, seed: int) -> str:
    return (f"{preset.name}-{layout.layers}x{layout.experts}-{preset.hidden}x{preset.expert_width}-{layout.dtype}"
            f"-seed{seed}")


def model_disk_store(preset, backend: Backend, store_dir: str, seed: int = 0, progress: bool = True):
    """(layout, opener) of the disk store `realrun model=<preset>` reads (`store_dir` or the default)."""
    layout = synthetic_layout(preset)
    folder = store_folder(store_dir, store_tag(preset, layout, seed))
    return layout, lambda: open_disk_store(folder, layout, backend, random_fill(layout, seed), f"random seed {seed}",
                                           progress=progress)


class KeptStores:
    """Host-memory stores kept from one real run to the next, for a caller that runs many
    (`confirm` runs every arm eight times).

    Building a `store=host` store draws and copies every expert (1.2 GB for mixtral-mini, 1.4 s
    here; pinned on CUDA, where pinning gigabytes is slower still), and a real system keeps its
    host tier resident between requests anyway. `close()` frees them."""

    def __init__(self) -> None:
        self._stores: dict[str, HostStore] = {}

    def host(self, tag: str, layout: Layout, backend: Backend, fill) -> HostStore:
        store = self._stores.get(tag)
        if store is None:
            store = self._stores[tag] = new_host_store(layout, backend, fill)
        store.backend = backend  # this run's (its copy threads take their settings from it)
        return store

    def holds(self, store) -> bool:
        return any(store is s for s in self._stores.values())

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()


def new_host_store(layout: Layout, backend: Backend, fill) -> HostStore:
    check_memory(layout.total_bytes, "store=host (every expert in host memory)")
    return HostStore(layout, backend, fill)


def open_store(opts: RealOptions, layout: Layout, backend: Backend, fill, fill_id: str, tag: str,
               keep: KeptStores | None = None):
    if opts.store == "host":
        return keep.host(tag, layout, backend, fill) if keep is not None else new_host_store(layout, backend, fill)
    folder = store_folder(opts.store_dir, tag)
    return open_disk_store(folder, layout, backend, fill, fill_id, progress=opts.progress)


def real_run(cfg: RunConfig, opts: RealOptions, trace: Trace | None = None,
             hw: HardwareProfile | None = None, keep: KeptStores | None = None) -> RunResult:
    """Replay `cfg`'s trace with real copies and compute. With `keep`, a `store=host` store is
    taken from it (built on first use) and left open for the next run."""
    backend = Backend(opts.device, opts.threads, opts.pin)
    if opts.store == "host" and (cfg.host_cache.slots or cfg.host_cache.bytes):
        raise UserError("host_cache: store=host keeps every expert in host memory already; a host cache in front "
                        "of storage (docs/tiers.md) needs store=disk")
    hw = tier_for(hw if hw is not None else load_profile(cfg.hw), opts.store)
    trace = trace if trace is not None else load_trace(cfg.trace)
    cfg, trace = with_layers(cfg, trace, preset_of(cfg, trace), opts.layers)
    sim_engine, info = build_engine(cfg, trace, hw)  # the simulator's policies, plan and checks
    refuse_reserved(sim_engine.placement)
    books = sim_engine.link if isinstance(sim_engine.link, TierLink) else None  # a tiered run's books
    if books is not None:
        check_tiered(sim_engine, opts, books)
    serving = None
    if cfg.workload.kind != "replay":  # checked before any store is opened or written
        from sim.serving.run import build_serving

        serving = build_serving(cfg, sim_engine, info)  # the simulator's requests, scheduler and KV budget
    preset = sim_engine.ctx.preset
    layout = synthetic_layout(preset)
    placement = sim_engine.placement
    if placement.may_use_cpu and opts.store != "host" and books is None:
        raise UserError(f"placement {placement.name!r} computes missed experts on the CPU where they live: "
                        "use store=host (experts in host memory, as Fiddler keeps them), or a host cache "
                        "in front of the disk (host_cache.slots=N on a profile with a host tier)")
    slots, staging = info["cache_slots"], sim_engine.opt.staging_buffers
    n_buf = slots + 2 * staging  # + spare buffers for dropped staged prefetches still in flight
    check_memory(n_buf * layout.expert_bytes, f"a cache of {slots} slots + {2 * staging} staging buffers",
                 device=backend.cuda)
    if books is not None:  # the host cache's buffers and the bounce buffers made before the clock
        check_memory((books.host.slots + staging) * layout.expert_bytes,
                     f"a host cache of {books.host.slots} experts + {staging} bounce buffers")
    tag = store_tag(preset, layout, opts.weights_seed)
    store = open_store(opts, layout, backend, random_fill(layout, opts.weights_seed),
                       f"random seed {opts.weights_seed}", tag, keep)
    owned = keep is None or not keep.holds(store)  # a kept store outlives the run
    pool = SlotPool(backend, layout, n_buf)
    serving_run = serving is not None
    max_ctx = (int(trace.pos.max()) + 2 if trace.num_tokens else 2) + cfg.spec.k
    kernels = RandomKernels(backend, preset, layout.torch_dtype, max_ctx,
                            cfg.batch.max_tokens if serving_run else 1)
    facts: dict[str, Any] = {"realrun_device": backend.describe(), "realrun_store": store.kind,
                             "realrun_threads": opts.threads}
    if isinstance(store, DiskStore):
        check = store.page_cache_check(0, pool.matrices(0))
        facts.update({f"page_cache_{k}": v for k, v in check.items()})
    _warm_up(kernels, pool, cfg.batch.max_requests if serving_run else 1)
    cpu = CpuWorker(backend) if placement.may_use_cpu else None
    low = low_copies(sim_engine, layout, backend, opts, tag)
    machine = RealMachine(backend, store, pool, kernels, sim_engine.link,
                          channels=opts.channels if books is None else books.copy.channels,
                          chunk_bytes=sim_engine.yield_chunk_bytes, cpu_worker=cpu,
                          pipelining=sim_engine.opt.pipelining, low=low, host_spare=staging)
    sim_engine.set_machine(machine)  # the simulator's engine, policies and steps; the real machine's time
    wall0 = time.perf_counter()
    try:
        with backend.pinned():
            if serving is not None:
                serving.run()
                rec = sim_engine.rec
            else:
                rec = sim_engine.run()
    finally:
        machine.close()
        if owned:
            store.close()
        if low is not None:
            low.close()
    facts["realrun_wall_s"] = time.perf_counter() - wall0
    facts["realrun_copy_mean_s"] = copy_mean_s(rec.loads, layout.expert_bytes)
    if books is not None:  # the reads' own mean time, and the real host tier's buffers
        facts["realrun_read_mean_s"] = copy_mean_s(books.reads, layout.expert_bytes)
        facts.update(machine.host_tier.facts())
    if serving is not None:
        from sim.serving.run import serving_result

        return serving_result(cfg, sim_engine, info, serving, machine.link, machine.compute_busy_s, facts)
    return result_of(cfg, sim_engine, rec, info, hw, preset, facts)


def refuse_tiers(engine) -> None:
    """The live model (`realrun model=DIR`) has no host tier: a run whose profile puts a host cache in
    front of storage is refused, naming the key that turns it off (the synthetic real run has one)."""
    if isinstance(engine.link, TierLink):
        raise UserError("realrun live: a host cache in front of storage (docs/tiers.md) runs on the synthetic model "
                        "only (realrun without model=DIR); the live model reads experts from its store straight to "
                        "the device: give host_cache.slots=0")


def check_tiered(engine, opts: RealOptions, books: TierLink) -> None:
    """What a tiered real run does not execute, refused with the key that asks for it (UserError)."""
    if opts.store != "disk":
        raise UserError(f"store={opts.store} keeps every expert in host memory already; a host cache in front of "
                        "storage (docs/tiers.md) reads from the disk: give store=disk, or host_cache.slots=0")
    placement = engine.placement
    if not placement.always_load and placement.low_bytes:
        raise UserError(f"placement.name={placement.name}: a tiered real run copies full experts from its host "
                        "cache; low-precision copies run without one: give host_cache.slots=0 or another placement")
    hops = f"storage_to_host {books.read.channels}, host_to_device {books.copy.channels}"
    if opts.channels != 1 and opts.channels != books.copy.channels:
        raise UserError(f"channels={opts.channels}: a tiered real run has each hop's channels from the profile "
                        f"({hops}); leave channels= unset")


def refuse_reserved(placement) -> None:
    """A placement that keeps device bytes of its own (`reserved_bytes`, e.g. `partial_experts`' resident
    slices) is simulated only: the real run does not split experts. UserError."""
    if placement.reserved_bytes > 0:
        raise UserError(f"placement {placement.name!r} keeps slices of experts on the device; the real run does not "
                        f"split experts (simulated only): use another placement for realrun")


def low_copies(sim_engine, layout: Layout, backend: Backend, opts: RealOptions, tag: str):
    """The low-precision copies a `low_precision_on_miss` placement loads (None for other placements)."""
    placement = sim_engine.placement
    if placement.always_load or not placement.low_bytes:
        return None
    from sim.realrun.low import LowCopies

    return LowCopies.build(layout, placement, backend, random_fill(layout, opts.weights_seed),
                           staging=sim_engine.opt.staging_buffers, store_kind=opts.store, store_dir=opts.store_dir,
                           tag=tag, progress=opts.progress)


def copy_mean_s(loads, expert_bytes: float) -> float | None:
    """Mean time the copy worker spent on one whole expert (start to done: the link as this run met
    it, without the hand-offs); cut and partial copies do not count. None without copies."""
    if not len(loads):
        return None
    nbytes, moved = np.asarray(loads.nbytes), np.asarray(loads.moved)
    start, end = np.asarray(loads.start_s), np.asarray(loads.end_s)
    whole = (nbytes == expert_bytes) & (moved == nbytes) & (end >= 0.0) & (start >= 0.0)
    return float(np.mean(end[whole] - start[whole])) if whole.any() else None


def _warm_up(kernels: RandomKernels, pool: SlotPool, max_requests: int) -> None:
    """First calls of each op allocate and pick kernels: done before the clock starts (for
    batches of up to `max_requests` decode tokens too, in a serving run)."""
    host = [m.cpu() for m in pool.matrices(0)]
    for _ in range(3):
        kernels.attention(0, 0)
        for n in sorted({1, max(1, max_requests // 2), max(1, max_requests)}):
            kernels.expert(pool.matrices(0), 1.0, n)
            kernels.cpu_expert(host, 1.0, n)
        if max_requests > 1:
            kernels.attention_batch(0, [(0, 1)] * max_requests)
    kernels.backend.sync_all()


def result_of(cfg: RunConfig, engine, rec, info: dict, hw, preset, facts: dict) -> RunResult:
    """The run's frames and summary, as the simulator's (`engine` ran on a `RealMachine`)."""
    tokens, layers = rec.tokens_frame(), rec.layers_frame()
    tiers = engine.machine.tiers  # a tiered run's books (`TierLink`), filled for real; else None
    events = rec.events_frame(engine.E, tiers)
    end = engine.t_end
    link = engine.machine.link
    extra = dict(info)
    extra.update({"prefetch_skipped": engine.prefetch_skipped, "prefetch_cancelled": engine.prefetch_cancelled,
                  "makespan_s": end, "tokens_prefill": int(sum(rec.prefill["tokens"])),
                  "cpu_wait_s_per_token": float(tokens["cpu_wait_s"].mean()) if tokens.height else None,
                  "link_max_concurrent": link.max_active, "cache_peak_bytes": engine.cache.peak_bytes})
    if tiers is not None:  # per hop and the host cache, as `sim.runner.simulate` adds them (docs/tiers.md)
        extra.update(tiers.summary(engine.decoded, rec.loads, float(tokens["stall_s"].sum()), end))
    extra.update(facts)
    summary = summarize(tokens, layers, rec.prefill, n_layers=engine.L, link_busy_s=link.busy_s,
                        link_channels=link.channels, compute_busy_s=engine.machine.compute_busy_s, end_s=end,
                        extra=extra)
    return RunResult(cfg, summary, tokens, layers, events, hw, preset)


def write_real_results(res: RunResult, opts: RealOptions, out: Path, report: bool = True) -> Path:
    """The `run` results folder layout, plus `realrun.yaml` (the backend's options)."""
    with atomic.new_dir(out) as tmp:
        fill_real_results(res, opts, tmp, report=report, title=f"realrun {Path(out).name}")
    return out


def fill_real_results(res: RunResult, opts: RealOptions, tmp: Path, report: bool = True, title: str = "") -> None:
    """Write `write_real_results`' files into `tmp`, the temporary folder of a claimed output."""
    from sim.results.folder import resolved_config

    cfg = resolved_config(res)
    cfg["realrun"] = dataclasses.asdict(opts)
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (tmp / "summary.json").write_text(json.dumps(res.summary, indent=2))
    res.tokens.write_parquet(tmp / "tokens.parquet")
    res.layers.write_parquet(tmp / "layers.parquet")
    res.events.write_parquet(tmp / "events.parquet")
    if res.requests is not None:  # a serving run
        res.requests.write_parquet(tmp / "requests.parquet")
        res.steps.write_parquet(tmp / "steps.parquet")
    if report:
        from sim.results.report import run_report, write_html

        title = title or f"realrun {tmp.name}"
        if res.requests is not None:
            from sim.serving.report import serving_report

            write_html(serving_report(res.summary, res.requests, res.steps, title), tmp / "report.html")
        else:
            write_html(run_report(res.summary, res.tokens, res.layers, res.events, title), tmp / "report.html")
