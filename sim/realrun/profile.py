"""A hardware profile from calibration measurements (`sim/realrun/calibrate.py`).

`build_profile` fits the measured series (see the calibrate module) into the profile schema of
`hwprofiles/README.md`; every number's source is `measured: <the command>, <date>; <how>`.

With the disk (`store=disk`) the profile describes both paths a real run has: `storage_to_device`
(disk -> slot, experts on storage with no host cache) and the two hops of a tiered run,
`storage_to_host` (disk -> host buffer) and `host_to_device` (host buffer -> slot), with
`host_memory_reserve_bytes` (host memory in use by others when calibrated). On device=cpu a slot
is host memory, so `storage_to_host` is the `storage_to_device` fit (the same reads, said in its
source); the profile is then `unified_memory: true`, and a run on it has no host tier by default
(docs/tiers.md); `confirm`'s `tiersN` arm says how it runs one.
"""

from __future__ import annotations

import numpy as np

from sim.machine.cost import N_ATTN_KERNELS, N_EXPERT_KERNELS
from sim.realrun.calibrate import (
    CONTENTION_THRESHOLD,
    DISK_HOST,
    CalibrateOptions,
    Measured,
    describe_machine,
    fit_affine,
    measure,
    memory_facts,
    today,
)


def calibrate(opts: CalibrateOptions, command: str) -> tuple[dict, list[tuple[str, str, str]]]:
    """Measure once; returns (profile mapping ready for YAML, printable rows (what, value, spread))."""
    return build_profile(measure(opts), opts, command)


def build_profile(m: Measured, opts: CalibrateOptions, command: str) -> tuple[dict, list[tuple[str, str, str]]]:
    """The profile from measurements: fits, the real run's fixed costs, contention, memory."""
    backend, sizes, hidden, anchors, repeats = m.backend, m.sizes, m.hidden, m.anchors, m.repeats
    links, expert, stand_in, cpu = m.links, m.expert, m.stand_in, m.cpu
    flops, flops_spread, cpu_flops = float(np.median(m.flops)), m.flops_spread, float(np.median(m.cpu_flops))
    contention = {k: tuple(float(np.mean(col)) for col in zip(*v, strict=True)) for k, v in m.contention.items()}
    fixed = {k: float(np.mean([f[k] for f in m.fixed])) for k in m.fixed[0]}
    fixed["k"] = int(fixed["k"])
    sessions = f", {m.sessions} sessions pooled" if m.sessions > 1 else ""
    if m.probes:
        sessions += (f" with {m.probes} probes of the links and compute at the model's sizes, "
                     "one before each real run")
    src = f"measured: {command}, {today()}{sessions}"
    rows: list[tuple[str, str, str]] = []
    op_ovh, spb = fit_affine([(expert, N_EXPERT_KERNELS), (stand_in, N_ATTN_KERNELS)], anchors)
    op_c_ovh, c_spb = fit_affine([(cpu, N_EXPERT_KERNELS)], anchors)
    # the fixed costs the simulator charges per layer (8 + 4k kernels) are the real run's own, measured
    # on a tiny all-cached model: ops + policy calls + bookkeeping (the op-level intercepts miss the last two)
    k = fixed["k"]
    kernels = N_ATTN_KERNELS + k * N_EXPERT_KERNELS
    ovh = max(0.0, (fixed["device"] - (fixed["layer_bytes"] + k * fixed["expert_bytes"]) * spb) / kernels)
    # the CPU worker's fixed cost is the intercept of its own fit: the series times a hand-off of two
    # experts from submit to the main thread waking up, at the sizes the run uses. Its thread
    # hand-off (~50 us per layer here, both ways) is most of it; a tiny model's run does not
    # measure it, since how fast an idle vCPU wakes depends on how long it has idled (haltpoll).
    # The run's own bookkeeping per expert (policy calls, placement, gathering the outputs: the part
    # of the device's fixed cost that its ops alone do not explain) is spent by the same loop
    # whichever side computes the expert, so the CPU's kernels carry it too
    bookkeeping = max(0.0, ovh - op_ovh)
    c_ovh = op_c_ovh + bookkeeping

    def num(value: float, detail: str) -> dict:
        return {"value": float(value), "source": f"{src}; {detail}"}

    prof: dict = {
        "name": opts.name,
        "description": (f"this machine as calibrate measured it ({describe_machine(backend)}); device={opts.device}, "
                        f"experts offloaded to {'disk (page cache dropped before each read)' if opts.store == 'disk' else 'host memory'}; "
                        f"copies by one copy worker"),
        "unified_memory": not backend.cuda,
        "expert_tier": "storage" if opts.store == "disk" else "host",
    }
    sz = ", ".join(f"{s / 1e6:.3g}" for s in sizes)
    prof["device"] = {
        "memory_bandwidth_Bps": num(1 / spb, f"batch-1 SwiGLU expert and stand-in GEMV, cold weights, {sz} MB, "
                                             f"{repeats} repeats each, medians (mean over sessions and probes) fitted jointly (spread up to "
                                             f"{max(expert.spread(), stand_in.spread()):.0%})"),
        "matmul_flops": num(flops, f"GEMM 256 x {hidden} x 2048, median (spread {flops_spread:.0%})"),
        "kernel_overhead_s": num(ovh, f"realrun's per-layer fixed time on a tiny all-cached model, "
                                      f"{fixed['device'] * 1e6:.1f} us, over the {kernels} kernels the cost model "
                                      f"charges a top-{k} layer ({N_ATTN_KERNELS} + {k} x {N_EXPERT_KERNELS}); the "
                                      f"op-level fit alone gives {op_ovh * 1e6:.2f} us per kernel"),
    }
    prof["cpu"] = {
        "memory_bandwidth_Bps": num(1 / c_spb, f"SwiGLU expert run by the CPU worker thread from host memory, "
                                               f"{sz} MB (spread up to {cpu.spread():.0%})"),
        "matmul_flops": num(cpu_flops, f"GEMM 256 x {hidden} x 2048 on the host CPU, median"),
        "kernel_overhead_s": num(c_ovh, f"intercept of the same fit over {N_EXPERT_KERNELS} kernels per expert "
                                        f"({op_c_ovh * 1e6:.2f} us: the hand-off of 2 experts to the worker "
                                        f"thread and back, shared by them, at the sizes measured) plus the real "
                                        f"run's bookkeeping per kernel ({bookkeeping * 1e6:.2f} us: the device "
                                        f"overhead above less its ops' own)"),
    }
    mem = memory_facts(backend)
    prof["device_memory_bytes"] = num(mem["device"], "/proc/meminfo MemTotal" if not backend.cuda
                                      else "torch.cuda.mem_get_info total")
    prof["host_memory_bytes"] = num(mem["host"], "/proc/meminfo MemTotal")
    prof["memory_reserve_bytes"] = num(mem["reserve"], "memory in use by others when calibrated "
                                                       "(MemTotal - MemAvailable; CUDA: total - free)")
    if opts.store == "disk":  # experts on storage: a tiered run's default host cache leaves this to others
        prof["host_memory_reserve_bytes"] = num(mem["host_reserve"], "host memory in use by others when "
                                                                     "calibrated (/proc/meminfo MemTotal - MemAvailable)")
    prof["expert_cache_bytes"] = None
    prof["links"] = {}
    rows.append(("device GEMV bandwidth", f"{1 / spb / 1e9:.2f} GB/s", f"{max(expert.spread(), stand_in.spread()):.0%}"))
    rows.append(("realrun fixed time per layer (device experts)", f"{fixed['device'] * 1e6:.1f} us", ""))
    rows.append(("device kernel overhead", f"{ovh * 1e6:.2f} us (ops alone {op_ovh * 1e6:.2f})", ""))
    rows.append(("device matmul", f"{flops / 1e9:.1f} GFLOP/s", f"{flops_spread:.0%}"))
    rows.append(("cpu-worker GEMV bandwidth", f"{1 / c_spb / 1e9:.2f} GB/s", f"{cpu.spread():.0%}"))
    rows.append(("cpu-worker overhead per kernel (hand-off, bookkeeping)",
                 f"{c_ovh * 1e6:.2f} us ({op_c_ovh * 1e6:.2f} + {bookkeeping * 1e6:.2f})", ""))
    names = {"disk": "storage_to_device", "host": "host_to_device", DISK_HOST: "storage_to_host"}
    jobs = [(kind, names[kind], series) for kind, series in links.items()]
    if "disk" in links and DISK_HOST not in links:  # device=cpu: a slot is host memory, the read is the same
        jobs.append(("disk", "storage_to_host", links["disk"]))
    for kind, name, series in jobs:
        lat, spb_l = fit_affine([(series, 1.0)], anchors)
        what = {"disk": "safetensors reads after posix_fadvise(DONTNEED), by the copy worker thread",
                "host": "host -> slot copies by the copy worker" + (" (pinned, own CUDA stream)" if backend.cuda else ""),
                DISK_HOST: "safetensors reads after posix_fadvise(DONTNEED) into pinned host buffers, by a tiered "
                           "run's read worker thread"}[kind]
        if name == "storage_to_host" and kind == "disk":
            what += (" into slots in host memory (device=cpu): the reads a tiered run's read worker makes into its "
                     "host buffers, the storage_to_device series itself")
        worker = "read worker" if name == "storage_to_host" else "copy worker"
        prof["links"][name] = {
            "bandwidth_Bps": num(1 / spb_l, f"{what}; expert-shaped copies of {sz} MB, {repeats} repeats per session, "
                                            f"medians (mean over sessions and probes) fitted as latency + bytes / bandwidth "
                                            f"(spread up to {series.spread():.0%})"),
            "latency_s": num(lat, "fixed cost of the same fit: submit to wake-up of the waiting thread"),
            "channels": num(1, f"one {worker} thread (calibrate times one; a run has one thread per channel)"),
            # a read into pinned host memory leaves the device's memory alone (CUDA: not measured for it)
            "shares_memory_bandwidth": bool(kind in contention and contention[kind][0] > CONTENTION_THRESHOLD),
        }
        rows.append((f"{name} bandwidth", f"{1 / spb_l / 1e9:.3f} GB/s", f"{series.spread():.0%}"))
        rows.append((f"{name} latency", f"{lat * 1e6:.0f} us", ""))
        for s, m in zip(series.sizes, series.values, strict=True):
            rows.append((f"  {name} {s / 1e6:.3g} MB", f"{m * 1e3:.3f} ms", ""))
        if kind not in contention or name == "storage_to_host" and kind == "disk":
            continue  # (no contention measured for it, or it is storage_to_device's, printed above)
        slow, slow_spread, copy_slow = contention[kind]
        rows.append((f"compute slowdown while {name} copies", f"{slow:.3f}x -> shares_memory_bandwidth="
                     f"{str(slow > CONTENTION_THRESHOLD).lower()}", f"{slow_spread:.0%}"))
        rows.append((f"{name} copy slowdown while computing", f"{copy_slow:.3f}x", ""))
    return prof, rows
