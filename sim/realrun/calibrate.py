"""`calibrate`: measure what a hardware profile needs on this machine, with the real-run code.

Every figure is timed through the very code `realrun` executes, so the profile describes the
machine as the real run sees it:
  links      a copy of an expert-shaped transfer (3 matrices) by the copy worker into one of many
             slots (cold memory, as a run's), from submit to the main thread waking up on its
             completion, for several sizes: fitted as
             `latency_s + bytes / bandwidth_Bps` (least squares on relative error); disk reads
             drop the page cache first, exactly as `realrun store=disk` does; with the disk, the
             hops of a tiered run too: `host_to_device` (host buffer -> slot) and `storage_to_host`
             (disk -> host buffer by the read worker, `sim/realrun/tiers.py`; on device=cpu a
             slot is host memory, so that read is the `storage_to_device` measurement itself);
  device     a batch-1 SwiGLU expert (4 kernels in the cost model; from the run's slot pool,
             after an idle wait as for its copy; back to back on CUDA) and the non-expert stand-in GEMV (8 kernels,
             back to back), cold weights (cycled through more memory than the CPU caches hold),
             several sizes, fitted jointly as `kernels * kernel_overhead_s + bytes / bandwidth`;
             `matmul_flops` from a prefill-sized GEMM;
  cpu        the same SwiGLU run by the CPU worker thread from host memory (placement=cpu),
             two per hand-off, each hand-off after the layer's stand-in, submit-to-wake-up included;
  contention the expert compute time while the copy worker copies without pause, over the time
             alone: `shares_memory_bandwidth` is true when copies slow compute by more than 3%;
  memory     /proc/meminfo (CPU) or the CUDA device's total and free memory; the host memory in
             use by others (MemTotal - MemAvailable) is the host reserve a tiered run's default
             host cache leaves (`host_memory_reserve_bytes`, with the disk only).
Each point is measured `repeats` times, each time as the mean of `BATCH` consecutive calls (the
real run's time is a sum of such calls, so their mean duration is what the profile must give);
the median over repeats is a session's value and the spread (p10-p90 over the median) is printed.
Sessions and probes pooled (`merge`, `add_probes`) give each point the mean of their values
(`Series.values`: the machine drifts, and a run meets its slow moments as well as its fast ones).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sim.errors import UserError
from sim.realrun.backend import Backend, cpu_name, meminfo
from sim.realrun.compute import CpuWorker, SlotPool
from sim.realrun.link import DEMAND, CopyWorker
from sim.realrun.store import HostStore, Layout, open_disk_store, random_fill

CONTENTION_THRESHOLD = 1.03
BATCH = 4  # calls per measurement (its mean is one sample)
DISK_HOST = "disk_host"  # the link kind of a tiered run's storage read: disk -> host buffer (CUDA only)
ANCHOR_WEIGHT = 10.0
COLD_BYTES = 192 * 2**20  # cycle weights through this much memory (more than any CPU cache here)
EXPERT_IDLE_S = 0.002  # a run's thread waits about this long for an expert's copy before computing it


@dataclass
class Series:
    """Repeated timings of one operation at several sizes (bytes), taken at one or more moments
    (a calibration session, a probe): `runs[j]` every sample at size j, `moments[j]` the median of
    each moment's samples there."""

    sizes: list[float] = field(default_factory=list)
    runs: list[np.ndarray] = field(default_factory=list)
    moments: list[list[float]] = field(default_factory=list)

    def add(self, nbytes: float, times: list[float]) -> None:
        self.sizes.append(float(nbytes))
        self.runs.append(np.asarray(times, dtype=float))
        self.moments.append([float(np.median(times))])

    @property
    def values(self) -> np.ndarray:
        """The time at each size: the mean over moments of each moment's median. (Probes add moments
        at the model's sizes only, so those points average over more of the session's time than
        the others; the fits weigh those points most, ANCHOR_WEIGHT.)

        A median within a moment discards the odd disturbed batch; a mean across moments, because a
        shared machine drifts (here an expert's compute moved by up to 75% within a minute) and a
        run's time is the time average over the moments it met, slow ones included: the median
        over moments would keep the typical moment and miss the slow stretches."""
        return np.array([np.mean(m) for m in self.moments])

    def pooled_with(self, others: list[Series]) -> Series:
        """This series with the samples and moments of `others` at the same sizes added (sizes
        only some of them have keep what they have)."""
        runs = [list(r) for r in self.runs]
        moments = [list(m) for m in self.moments]
        for o in others:
            for size, r, m in zip(o.sizes, o.runs, o.moments, strict=True):
                j = self.index(size)
                if j is not None:
                    runs[j] += list(r)
                    moments[j] += m
        return Series(list(self.sizes), [np.asarray(r, dtype=float) for r in runs], moments)

    def index(self, nbytes: float, rel_tol: float = 1e-6) -> int | None:
        """Position of the measured size within `rel_tol` of `nbytes`, or None."""
        for j, x in enumerate(self.sizes):
            if abs(x - nbytes) <= rel_tol * nbytes:
                return j
        return None

    def spread(self) -> float:
        """Largest (p90 - p10) / median over the sizes, over every sample pooled: within one session
        the repeat-to-repeat noise, over pooled sessions and probes the drift between them too."""
        return max(float((np.percentile(r, 90) - np.percentile(r, 10)) / np.median(r)) for r in self.runs)


def fit_affine(groups: list[tuple[Series, float]], anchors: tuple[float, ...] = ()) -> tuple[float, float]:
    """Fit t = k * a + bytes * b over series with per-series multipliers k (relative least squares).

    Points whose size is in `anchors` (the sizes the run will really move: the model's expert and
    non-expert bytes) weigh ANCHOR_WEIGHT times more, so the line is right where it is used.
    Returns (a, b), a >= 0 (a fixed cost per kernel or per transfer), b > 0 (seconds per byte)."""
    rows, rhs = [], []
    for s, k in groups:
        for x, t in zip(s.sizes, s.values, strict=True):
            w = ANCHOR_WEIGHT if any(abs(x - a) <= 1e-6 * a for a in anchors) else 1.0
            rows.append([w * k / t, w * x / t])
            rhs.append(w)
    A, y = np.asarray(rows), np.asarray(rhs)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    if a < 0:  # no measurable fixed cost: slope only
        a = 0.0
        b = float(np.sum(A[:, 1] * y) / np.sum(A[:, 1] ** 2))
    if not b > 0:  # noise swamps the slope (tiny sizes, a busy machine): weaker fits, then bytes / time
        if anchors:
            return fit_affine(groups, ())
        s, _ = max(groups, key=lambda g: max(g[0].sizes))
        i = int(np.argmax(s.sizes))
        a, b = 0.0, float(s.values[i] / s.sizes[i])
    return float(a), float(b)


def expert_layout(nbytes: float, hidden: int, dtype: str, experts: int) -> Layout:
    item = 4 if dtype == "float32" else 2
    width = max(1, round(nbytes / (3 * hidden * item)))
    return Layout(1, experts, ((width, hidden), (width, hidden), (hidden, width)), dtype)


def cold_count(nbytes: float) -> int:
    """How many copies of an `nbytes` weight make COLD_BYTES (4 to 512 of them)."""
    return int(min(512, max(4, math.ceil(COLD_BYTES / nbytes))))


def _cold_copies(layout: Layout, backend: Backend) -> list[list[torch.Tensor]]:
    """Enough copies of one random expert (COLD_BYTES) that cycling through them reads memory, not a
    CPU cache. Copies of one draw, not one draw each: the timing does not depend on the values, and
    drawing 192 MB of random numbers took longer than the measurement (probes repeat this)."""
    n = cold_count(layout.expert_bytes)
    one = [torch.randn(s, dtype=torch.float32).mul_(0.02).to(layout.torch_dtype).to(backend.device)
           for s in layout.shapes]
    return [one] + [[m.clone() for m in one] for _ in range(n - 1)]


def _swiglu(x: torch.Tensor, m: list[torch.Tensor]) -> torch.Tensor:
    import torch.nn.functional as F

    return F.linear(F.silu(F.linear(x, m[0])) * F.linear(x, m[1]), m[2])


def time_calls(fn: Callable[[int], None], repeats: int, backend: Backend, warm: int = 3,
               batch: int = BATCH, before: Callable[[int], None] | None = None) -> list[float]:
    """`repeats` measurements of `fn`, each the mean time of `batch` consecutive calls.

    A batch mean, not a single call: the real run's time is a sum of many such operations, so
    the mean duration is what must be modelled (single-call times of disk reads are skewed to
    the right, and their median is below their mean); the median over repeats then discards
    the occasional disturbed batch. `before(i)`, when given, runs untimed before each call: what
    a run does just before such a call (waits for a copy, computes a layer's other work), which
    changes how long the call takes."""
    for i in range(warm):
        fn(i)
    backend.sync()
    out = []
    i = 0
    for _ in range(repeats):
        total = 0.0
        t0 = time.perf_counter()
        for _ in range(batch):
            if before is not None:
                before(i)
                backend.sync()
                t0 = time.perf_counter()
            fn(i)
            i += 1
            if before is not None:
                backend.sync()
                total += time.perf_counter() - t0
        backend.sync()
        out.append((total if before is not None else time.perf_counter() - t0) / batch)
    return out


def idle(seconds: float) -> Callable[[int], None]:
    """A `before` for `time_calls`: the thread blocks, as on a copy it waits for."""
    ev = threading.Event()
    return lambda i: ev.wait(seconds)


def cold_slots(nbytes: float, total_bytes: float = 128e6) -> int:
    """Destination buffers a link measurement cycles through: enough (>= 128 MB) that each copy
    lands in memory no CPU cache holds, as in a run, whose cache slots are written in turn. Copies
    into one hot buffer were 5-10% faster here than the same reads during a run."""
    return max(2, math.ceil(total_bytes / nbytes))


class Calibrator:
    """Runs the measurements; `bar` is a tqdm bar advanced once per measured point."""

    def __init__(self, backend: Backend, sizes: list[float], hidden: int, dtype: str, repeats: int,
                 store_dir: Path, bar, anchors: tuple[float, ...] = (), model_store=None):
        self.b, self.sizes, self.H, self.dtype, self.repeats = backend, sizes, hidden, dtype, repeats
        self.store_dir, self.bar = store_dir, bar
        self.anchors = anchors
        self.model_store = model_store  # (layout, () -> DiskStore) of the model's own expert store

    def _step(self, what: str) -> None:
        self.bar.set_postfix_str(what)
        self.bar.update()

    # ------------------------------------------------------------------ links
    def _store(self, kind: str, nbytes: float):
        """A store of `nbytes` experts to copy from: the model's own store for its expert size (the
        very files realrun reads), else one of enough experts (>= 128 MB) to read them in random
        order, as a run does (re-reading a handful of experts in turn is slower on some disks).
        `disk_host`: the disk store read into host buffers, as a tiered run's read worker does."""
        if kind == DISK_HOST:
            from sim.realrun.tiers import DiskToHost

            store, n = self._store("disk", nbytes)
            return DiskToHost(store), n
        if kind == "disk" and self.model_store is not None:
            layout = self.model_store[0]
            if layout.expert_bytes == round(nbytes):
                return self.model_store[1](), layout.layers * layout.experts
        n = int(min(256, max(8, math.ceil(128e6 / nbytes))))
        layout = expert_layout(nbytes, self.H, self.dtype, experts=n)
        fill = random_fill(layout, 0)
        if kind == "disk":
            tag = f"calibrate-{n}x{layout.shapes[0][0]}x{self.H}-{self.dtype}"
            return open_disk_store(self.store_dir / tag, layout, self.b, fill, "random seed 0", progress=False), n
        return HostStore(layout, self.b, fill), n

    def link(self, kind: str, sizes: list[float] | None = None) -> tuple[Series, Series]:
        """(submit to wake-up per copy, as batch means; the copy worker's own time per copy, start
        to done, every call: what `realrun_copy_mean_s` measures in a run). `sizes`: default all."""
        s, own = Series(), Series()
        rng = np.random.default_rng(0)
        for nbytes in sizes or self.sizes:
            store, n = self._store(kind, nbytes)
            layout = store.layout
            slots = cold_slots(layout.expert_bytes)
            if kind == DISK_HOST:  # into host buffers (pinned on CUDA), as a tiered run reads
                from sim.realrun.tiers import HostPool

                pool = HostPool(self.b, layout, slots)
            else:
                pool = SlotPool(self.b, layout, slots)
            worker = CopyWorker(store, pool, time.perf_counter)
            order = rng.permutation(np.arange(n).repeat(math.ceil(4 * (BATCH * self.repeats + 3) / n)))
            copies: list[float] = []

            def copy(i: int, worker=worker, layout=layout, order=order, slots=slots, copies=copies) -> None:
                tr = worker.submit(int(order[i % len(order)]), layout.expert_bytes, DEMAND, i % slots)
                worker.wait(tr)
                worker.advance()
                copies.append(tr.done_s - tr.start_s)

            s.add(layout.expert_bytes, time_calls(copy, self.repeats * self.anchor_factor(nbytes), self.b))
            own.add(layout.expert_bytes, copies[-self.repeats * self.anchor_factor(nbytes) * BATCH:])
            worker.close()
            store.close()
            self._step(f"{kind} {layout.expert_bytes / 1e6:.2f} MB")
        return s, own

    def anchor_factor(self, nbytes: float) -> int:
        """Sizes the run really uses are measured 3 times as often."""
        return 3 if any(abs(nbytes - a) <= 1e-6 * a for a in self.anchors) else 1

    # ------------------------------------------------------------------ compute
    def expert(self, sizes: list[float] | None = None) -> Series:
        """A batch-1 SwiGLU expert as a run computes a loaded one: from a slot of the run's own
        slot pool, after the thread has waited (idle, EXPERT_IDLE_S) as for the expert's copy.
        Timed back to back from separate tensors instead, experts ran 20-30% faster here than in
        the runs (the stand-in, which a run computes right after the last layer's experts, is
        timed back to back). On CUDA the calls stay back to back: a synchronise per call would add
        its own latency, and a run queues a GPU's kernels without one."""
        s = Series()
        x = torch.randn((1, self.H)).to(self.b.device, Layout(1, 1, (), self.dtype).torch_dtype)
        for nbytes in sizes or self.sizes:
            layout = expert_layout(nbytes, self.H, self.dtype, 1)
            copies = _cold_copies(layout, self.b)
            pool = SlotPool(self.b, layout, len(copies))
            for j, c in enumerate(copies):
                for dst, src in zip(pool.matrices(j), c, strict=True):
                    dst.copy_(src)
            del copies
            s.add(layout.expert_bytes, time_calls(lambda i, p=pool: _swiglu(x, p.matrices(i % p.n)),
                                                  self.repeats * self.anchor_factor(nbytes), self.b,
                                                  before=None if self.b.cuda else idle(EXPERT_IDLE_S)))
            del pool
            self._step(f"expert {layout.expert_bytes / 1e6:.2f} MB")
        return s

    def stand_in(self, sizes: list[float] | None = None) -> Series:
        import torch.nn.functional as F

        s = Series()
        dtype = Layout(1, 1, (), self.dtype).torch_dtype
        x = torch.randn((1, self.H)).to(self.b.device, dtype)
        for nbytes in sizes or self.sizes:
            ws = self._cold_stand_in(nbytes)
            s.add(ws[0].numel() * x.element_size(),
                  time_calls(lambda i, ws=ws: F.linear(x, ws[i % len(ws)]),
                             self.repeats * self.anchor_factor(nbytes), self.b))
            del ws
            self._step(f"stand-in {nbytes / 1e6:.2f} MB")
        return s

    def _cold_stand_in(self, nbytes: float) -> list[torch.Tensor]:
        """Stand-in weights of `nbytes` each on the device, COLD_BYTES of them (see _cold_copies)."""
        dtype = Layout(1, 1, (), self.dtype).torch_dtype
        rows = max(1, round(nbytes / (self.H * torch.empty((), dtype=dtype).element_size())))
        n = cold_count(nbytes)
        one = torch.randn((rows, self.H)).to(self.b.device, dtype)
        return [one] + [one.clone() for _ in range(n - 1)]

    def matmul_flops(self, on_cpu: bool = False, tokens: int = 256, width: int = 2048) -> tuple[float, float]:
        import torch.nn.functional as F

        dtype = Layout(1, 1, (), self.dtype).torch_dtype
        dev = torch.device("cpu") if on_cpu else self.b.device
        x = torch.randn((tokens, self.H)).to(dev, dtype)
        w = torch.randn((width, self.H)).to(dev, dtype)
        t = time_calls(lambda i: F.linear(x, w), max(5, self.repeats // 2), _CPU if on_cpu else self.b)
        self._step("matmul")
        med = float(np.median(t))
        return 2.0 * tokens * self.H * width / med, float((np.percentile(t, 90) - np.percentile(t, 10)) / med)

    def cpu_expert(self, sizes: list[float] | None = None) -> Series:
        """Two experts handed to the CPU worker and back, as a top-2 layer with both experts on the
        CPU: each hand-off right after the main thread has computed a layer's non-expert work (the
        stand-in, untimed), as in a run; back to back, hand-offs ran 3-5% faster here."""
        import torch.nn.functional as F

        s = Series()
        worker = CpuWorker(self.b)
        x = torch.randn((1, self.H)).to(Layout(1, 1, (), self.dtype).torch_dtype)
        # the model's non-expert bytes; without a model, the size nearest 4 MB (not the largest
        # measured size: COLD_BYTES of copies of a huge one would sit beside the experts' copies)
        layer = self._cold_stand_in(self.anchors[1] if len(self.anchors) > 1 else expert_size(self.sizes, ()))
        xd = x.to(self.b.device)

        def after_layer(i: int) -> None:  # the layer's non-expert work, just before its hand-off
            F.linear(xd, layer[i % len(layer)])

        for nbytes in sizes or self.sizes:
            layout = expert_layout(nbytes, self.H, self.dtype, 1)
            copies = _cold_copies(layout, _CPU)  # host memory, where the CPU worker computes

            def job(i: int, c=copies) -> None:  # two experts per hand-off, as a top-2 layer hands them over
                worker.submit([(j, lambda j=j: _swiglu(x, c[(2 * i + j) % len(c)])) for j in range(2)])
                worker.wait()

            per_job = time_calls(job, self.repeats * self.anchor_factor(nbytes), self.b, before=after_layer)
            s.add(layout.expert_bytes, [t / 2 for t in per_job])
            del copies
            self._step(f"cpu expert {layout.expert_bytes / 1e6:.2f} MB")
        worker.close()
        return s

    # ------------------------------------------------------------------ the real run's own fixed costs
    def engine_fixed(self, threads: int) -> dict[str, float]:
        """Per-layer time of `realrun` itself on a tiny model whose every expert is cached: the fixed
        costs of one layer (ops, policy calls, bookkeeping) with its experts on the device.

        Returns {"device": s per layer, "layer_bytes", "expert_bytes", "k"}."""
        from sim.config import parse_run_config
        from sim.machine.models import ModelPreset
        from sim.realrun.build import RealOptions, register_preset
        from sim.realrun.run import real_run
        from sim.trace.synthetic import random_trace

        bits = 32 if self.dtype == "float32" else 16
        preset = register_preset(ModelPreset(name=f"calibrate-tiny-{bits}", layers=8, experts=8, top_k=2, hidden=64,
                                             expert_width=64, heads=4, kv_heads=2, head_dim=16, vocab=256,
                                             bits=bits, attn_bits=bits, source="calibrate: fixed costs"))
        trace = random_trace(np.random.default_rng(0), tokens=16 + 4 * self.repeats, layers=8, experts=8, top_k=2)
        cfg = parse_run_config([f"model={preset}", "policy=baseline", "engine.prefill=false", "cache.slots=64"])
        opts = RealOptions(device=self.b.name, store="host", threads=threads, progress=False,
                           pin=self.b.main_cpus is not None)
        res = real_run(cfg, opts, trace=trace, hw=stub_profile())
        tok = res.tokens.filter(res.tokens["demand_loads"] == 0)
        out = {"device": float(np.median(tok["latency_s"].to_numpy()[-4 * self.repeats:])) / 8}
        self._step("fixed costs")
        p = register_and_get(preset)
        ctx = int(trace.pos.max()) + 1
        out["layer_bytes"] = p.non_expert_bytes_per_layer + p.kv_bytes_per_token_per_layer() * ctx
        out["expert_bytes"] = p.expert_bytes
        out["k"] = p.top_k
        return out

    # ------------------------------------------------------------------ contention
    def contention(self, kind: str, nbytes: float) -> tuple[float, float, float]:
        """(slowdown of expert compute while the copy worker is busy, its spread, copy slowdown)."""
        layout = expert_layout(nbytes, self.H, self.dtype, experts=8)
        fill = random_fill(layout, 0)
        if kind == "disk":
            tag = f"calibrate-{layout.shapes[0][0]}x{self.H}-{self.dtype}"
            store = open_disk_store(self.store_dir / tag, layout, self.b, fill, "random seed 0", progress=False)
        else:
            store = HostStore(layout, self.b, fill)
        pool = SlotPool(self.b, layout, 2)
        worker = CopyWorker(store, pool, time.perf_counter)
        copies = _cold_copies(expert_layout(nbytes, self.H, self.dtype, 1), self.b)
        x = torch.randn((1, self.H)).to(self.b.device, layout.torch_dtype)
        n = max(20, self.repeats * 2)

        def compute(i: int) -> None:
            _swiglu(x, copies[i % len(copies)])

        alone = np.median(time_calls(compute, n, self.b, batch=1))  # per call, as `together` below
        copy_alone = self._copy_time(worker, layout, busy=None)
        queued = [worker.submit(i % layout.experts, layout.expert_bytes, DEMAND, i % 2) for i in range(2)]
        together = []
        for i in range(n):
            if len(queued) < 2 or queued[-2].done:  # keep the copy worker busy without pause
                queued.append(worker.submit(i % layout.experts, layout.expert_bytes, DEMAND, i % 2))
            t0 = time.perf_counter()
            compute(i)
            self.b.sync()
            together.append(time.perf_counter() - t0)
        for tr in queued:
            worker.wait(tr)
        copy_busy = self._copy_time(worker, layout, busy=lambda i: compute(i))
        worker.close()
        store.close()
        self._step("contention")
        t = np.asarray(together)
        return (float(np.median(t) / alone), float((np.percentile(t, 90) - np.percentile(t, 10)) / np.median(t)),
                float(copy_busy / copy_alone))

    def _copy_time(self, worker: CopyWorker, layout: Layout, busy: Callable[[int], None] | None) -> float:
        """Median copy duration, alone or with the main thread computing without pause."""
        times = []
        for r in range(max(5, self.repeats // 2)):
            tr = worker.submit(r % layout.experts, layout.expert_bytes, DEMAND, 0)
            i = 0
            while busy is not None and not tr.done:
                busy(i)
                i += 1
            worker.wait(tr)
            worker.advance()
            times.append(tr.done_s - tr.start_s)
        return float(np.median(times))


def register_and_get(name: str):
    from sim.machine.models import PRESETS

    return PRESETS[name]


def stub_profile():
    """A profile for building policies only (no cost-aware policy runs in the fixed-cost probe)."""
    from sim.machine.hardware import Compute, HardwareProfile, LinkSpec

    c = Compute(1e10, 1e10, 0.0)
    return HardwareProfile(name="stub", description="stub", device=c, cpu=c, device_memory_bytes=1e12,
                           host_memory_bytes=1e12, unified_memory=True, expert_tier="host",
                           links={"host_to_device": LinkSpec("host_to_device", 1e10, 0.0, 1, False)},
                           memory_reserve_bytes=0.0, expert_cache_bytes=None, sources={})


class _CpuBackend:
    device = torch.device("cpu")
    cuda = False

    def sync(self) -> None:
        pass


_CPU = _CpuBackend()


def memory_facts(backend: Backend) -> dict[str, float]:
    mi = meminfo()
    host = float(mi.get("MemTotal", 0))
    host_in_use = float(host - mi.get("MemAvailable", host))  # by others, when calibrated
    if backend.cuda:  # in use by others (and the CUDA context): not this process's tensors or cached blocks
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        mine = torch.cuda.memory_allocated()
        return {"device": float(total), "host": host, "reserve": float(max(0, total - free - mine)),
                "host_reserve": host_in_use}
    return {"device": host, "host": host, "reserve": host_in_use, "host_reserve": host_in_use}


def describe_machine(backend: Backend) -> str:
    return f"{backend.describe()}; {cpu_name()}"


def today() -> str:
    return dt.date.today().isoformat()


# ------------------------------------------------------------------ the profile
@dataclass
class CalibrateOptions:
    device: str = "cpu"  # cpu | cuda
    store: str = "disk"  # disk: measure the disk and host memory; host: host memory only
    out: str = "hwprofiles/local.yaml"
    name: str = "local"
    model: str = ""  # a model preset: its expert size is among the measured sizes, its hidden is used
    hidden: int = 512  # SwiGLU hidden size of the measured experts (without model=)
    sizes: str = ""  # expert sizes in bytes, comma-separated (default 0.25, 1, 4, 16 MB)
    repeats: int = 15
    store_dir: str = ""  # where the disk stores live (default: the user cache folder, as for realrun)
    threads: int = 1
    pin: bool = True  # main thread and workers on separate CPUs, as realrun runs them
    quick: bool = False  # small sizes, few repeats (tests)
    progress: bool = True


def plan_sizes(opts: CalibrateOptions) -> tuple[list[float], int, str, tuple[float, ...]]:
    """(sizes in bytes, hidden, dtype, anchors) to measure; anchors: the model's expert and
    non-expert bytes, which the fits weigh most."""
    hidden, dtype, extra = opts.hidden, "float32", []
    if opts.model:
        from sim.machine.models import load_preset
        from sim.realrun.run import synthetic_layout

        preset = load_preset(opts.model)
        layout = synthetic_layout(preset)
        hidden, dtype = preset.hidden, layout.dtype
        extra = [float(layout.expert_bytes), float(preset.non_expert_bytes_per_layer)]
    if opts.sizes:
        try:
            sizes = [float(x) for x in opts.sizes.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"sizes must be numbers of bytes separated by commas, got {opts.sizes!r}") from None
    elif opts.quick:
        sizes = [64e3, 256e3, 1e6]
    else:
        sizes = [0.25e6, 1e6, 4e6, 16e6]
    sizes = sorted(set(sizes + extra))
    if len(sizes) < 2 or min(sizes) <= 0:
        raise UserError("calibrate needs at least two positive sizes")
    if opts.repeats < 3:
        raise UserError(f"repeats must be >= 3, got {opts.repeats}")
    return sizes, hidden, dtype, tuple(extra)


@dataclass
class Measured:
    """Raw calibration results (one session, or several merged: `merge`)."""

    backend: Backend
    sizes: list[float]
    hidden: int
    anchors: tuple[float, ...]
    repeats: int
    links: dict[str, Series]
    expert: Series
    stand_in: Series
    cpu: Series
    flops: list[float]
    flops_spread: float
    cpu_flops: list[float]
    contention: dict[str, list[tuple[float, float, float]]]
    fixed: list[dict[str, float]]
    sessions: int = 1
    #: the copy worker's own time per copy (start to done), every call, per link kind
    link_copy: dict[str, Series] = field(default_factory=dict)
    probes: int = 0  # machine probes pooled in (`add_probes`)

    def copy_mean_s(self, kind: str, nbytes: float) -> float | None:
        """Mean copy time (start to done) of `kind` at the measured size nearest `nbytes`, over every
        copy pooled (a run's `realrun_copy_mean_s` is the same kind of mean over its copies)."""
        s = self.link_copy.get(kind)
        j = s.index(nbytes, rel_tol=0.01) if s is not None else None
        return float(np.mean(s.runs[j])) if j is not None else None


def measure(opts: CalibrateOptions, backend: Backend | None = None) -> Measured:
    """One calibration session (a progress bar; pinned as realrun runs)."""
    from tqdm import tqdm

    from sim.realrun.build import RealOptions, check_options

    check_options(RealOptions(device=opts.device, store=opts.store, threads=opts.threads))
    backend = backend or Backend(opts.device, opts.threads, opts.pin)
    sizes, hidden, dtype, anchors = plan_sizes(opts)
    kinds = link_kinds(opts)
    ref = expert_size(sizes, anchors)  # contention at the expert size
    total = len(kinds) * len(sizes) + len([k for k in kinds if k != DISK_HOST]) + 3 * len(sizes) + 2 + int(backend.cuda)
    with tqdm(total=total, desc="calibrate", unit="point", disable=None if opts.progress else True) as bar, \
            backend.pinned():
        cal = calibrator(opts, backend, sizes, bar, opts.progress)
        links, link_copy = {}, {}
        for k in kinds:
            links[k], link_copy[k] = cal.link(k)
        expert, stand_in = cal.expert(), cal.stand_in()
        flops, flops_spread = cal.matmul_flops()
        cpu_flops = cal.matmul_flops(on_cpu=True)[0] if backend.cuda else flops
        cpu = cal.cpu_expert()
        contention = {k: [cal.contention(k, ref)] for k in kinds if k != DISK_HOST}
        fixed = cal.engine_fixed(opts.threads)
    return Measured(backend, sizes, hidden, anchors, cal.repeats, links, expert, stand_in, cpu, [flops],
                    flops_spread, [cpu_flops], contention, [fixed], link_copy=link_copy)


def link_kinds(opts: CalibrateOptions) -> list[str]:
    """The links a calibration times: the disk and host memory, or host memory only. On CUDA with
    the disk, also the disk read into host buffers (`DISK_HOST`: a tiered run's storage read; on
    the CPU that is the disk's own measurement, a slot being host memory)."""
    if opts.store != "disk":
        return ["host"]
    return ["disk", "host"] + ([DISK_HOST] if opts.device == "cuda" else [])


def expert_size(sizes: list[float], anchors: tuple[float, ...]) -> float:
    """The model's expert bytes (the first anchor), else the measured size nearest 4 MB."""
    return anchors[0] if anchors else min(sizes, key=lambda x: abs(x - 4e6))


def calibrator(opts: CalibrateOptions, backend: Backend, sizes: list[float], bar, progress: bool) -> Calibrator:
    """A `Calibrator` for `sizes` with the session's settings; with a model and the disk, its own
    store (written first if missing) is what the expert-sized disk point reads."""
    from sim.realrun.build import store_folder

    _, hidden, dtype, anchors = plan_sizes(opts)
    model_store = None
    if opts.model and "disk" in link_kinds(opts):
        from sim.machine.models import load_preset
        from sim.realrun.run import model_disk_store

        model_store = model_disk_store(load_preset(opts.model), backend, opts.store_dir, progress=progress)
    repeats = min(opts.repeats, 5) if opts.quick else opts.repeats
    return Calibrator(backend, sizes, hidden, dtype, repeats, store_folder(opts.store_dir, ""), bar, anchors,
                      model_store)


@dataclass
class Probe:
    """One short look at the machine at the sizes the run uses (`probe_machine`)."""

    links: dict[str, Series]  # per link kind: submit to wake-up, batch means (as `Measured.links`)
    link_copy: dict[str, Series]  # the copy worker's own time per copy (as `Measured.link_copy`)
    expert: Series  # at the model's expert size
    stand_in: Series  # at the model's non-expert size
    cpu: Series  # the CPU worker, at the expert size


def probe_machine(opts: CalibrateOptions, backend: Backend) -> Probe:
    """The links and the compute again, at the model's sizes only (about a second on this machine),
    for `confirm` to take before each real run. A shared machine drifts: here a disk's speed by
    10-20% within a minute and a batch-1 expert's compute by up to 75% (other tenants' memory
    traffic); calibration sessions sample a few seconds of it, probes spread over the runs sample
    the machine the runs met."""
    from tqdm import tqdm

    sizes, _, _, anchors = plan_sizes(opts)
    expert_bytes = [expert_size(sizes, anchors)]
    layer_bytes = [anchors[1]] if len(anchors) > 1 else expert_bytes
    with backend.pinned(), tqdm(disable=True) as bar:
        cal = calibrator(opts, backend, expert_bytes, bar, progress=False)
        links = {k: cal.link(k) for k in link_kinds(opts)}
        return Probe({k: v[0] for k, v in links.items()}, {k: v[1] for k, v in links.items()},
                     cal.expert(expert_bytes), cal.stand_in(layer_bytes), cal.cpu_expert(expert_bytes))


def add_probes(m: Measured, probes: list[Probe]) -> Measured:
    """`m` with the probes' samples pooled into its points of the same size (links and compute)."""
    if not probes:
        return m

    return dataclasses.replace(
        m, links={k: s.pooled_with([p.links[k] for p in probes]) for k, s in m.links.items()},
        link_copy={k: s.pooled_with([p.link_copy[k] for p in probes]) for k, s in m.link_copy.items()},
        expert=m.expert.pooled_with([p.expert for p in probes]),
        stand_in=m.stand_in.pooled_with([p.stand_in for p in probes]),
        cpu=m.cpu.pooled_with([p.cpu for p in probes]), probes=m.probes + len(probes))


def merge(ms: list[Measured]) -> Measured:
    """Sessions pooled (e.g. before and after the runs): every sample is kept (`runs`, for spreads and
    copy means) and every session is one moment (`moments`: a point's value is their mean)."""
    first = ms[0]

    def pool(get) -> Series:
        return get(first).pooled_with([get(m) for m in ms[1:]])

    return Measured(first.backend, first.sizes, first.hidden, first.anchors, first.repeats,
                    {k: pool(lambda m, k=k: m.links[k]) for k in first.links}, pool(lambda m: m.expert),
                    pool(lambda m: m.stand_in), pool(lambda m: m.cpu), [f for m in ms for f in m.flops],
                    max(m.flops_spread for m in ms), [f for m in ms for f in m.cpu_flops],
                    {k: [c for m in ms for c in m.contention[k]] for k in first.contention},
                    [f for m in ms for f in m.fixed], sum(m.sessions for m in ms),
                    {k: pool(lambda m, k=k: m.link_copy[k]) for k in first.link_copy})


