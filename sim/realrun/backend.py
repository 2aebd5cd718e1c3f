"""The compute device of a real run: the CPU, or one CUDA GPU.

CPU: expert slots are ordinary tensors in RAM, the copy worker is a thread, compute runs on the
main thread with `threads` intra-op threads (1 by default, so the copy worker keeps a core).
CUDA: slots are device tensors, the store's host tier is pinned, copies run on their own stream
and signal completion with events; compute runs on the default stream and is synchronised at
the end of each token (and wherever a measured duration needs it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

import torch

from sim.errors import UserError

DEVICES = ("cpu", "cuda")


def dtype_for(bits: float) -> torch.dtype:
    """The float type that stores a weight of `bits` bits (the real run computes in floats)."""
    if bits == 32:
        return torch.float32
    if bits == 16:
        return torch.bfloat16
    raise UserError(f"realrun computes with float weights: the preset's bits must be 32 or 16, got {bits:g} "
                    "(use quant.bits=32 quant.group_size=0, or a float preset such as model=mixtral-mini)")


class Backend:
    """One device. `sync()` waits for queued device work (a no-op on the CPU)."""

    def __init__(self, device: str, threads: int = 1, pin: bool = True):
        if device not in DEVICES:
            raise UserError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("device=cuda was requested but no CUDA GPU is available on this machine "
                            "(use device=cpu)")
        if threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        self.name = device
        self.device = torch.device(device)
        self.cuda = device == "cuda"
        self.threads = threads
        torch.set_num_threads(threads)
        # the copy and CPU workers need the GIL promptly when a copy or a CPU expert ends
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0002))
        self._local = threading.local()  # CUDA: each copy thread's own stream (`thread_copy_stream`)
        self.main_cpus, self.worker_cpus = cpu_split(threads) if pin else (None, None)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Run the block with the calling (main) thread on its own CPUs; restored afterwards.

        Without pinning, Linux tends to wake a worker on the CPU of the thread that woke it, so a
        copy issued before a compute only starts when that compute ends: a queueing delay that no
        copy engine has. Pinned, the copy worker has a core of its own, like a DMA engine."""
        if self.main_cpus is None:
            yield
            return
        saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.main_cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, saved)

    def enter_worker_thread(self) -> None:
        """Called by a worker thread (copy or CPU expert worker) when it starts.

        Pins it to the CPUs the main thread does not use, and sets its own torch thread count:
        OpenMP's thread count is per calling thread, so a new thread starts with one OpenMP thread
        per CPU of the machine whatever `torch.set_num_threads` said in the main thread. Pinned to
        one CPU, such a team spins against itself: on a 2-vCPU Intel Xeon a batch-1 expert took
        18.8 ms in the worker against 0.35 ms in the main thread, and host-memory copies ran at a
        third of their speed (the CPU build's MKL threads a GEMV there; on AMD it did not)."""
        if self.worker_cpus is not None:
            os.sched_setaffinity(0, self.worker_cpus)
        # no more threads than the CPUs it is pinned to (threads=2 on 2 CPUs leaves the workers one)
        torch.set_num_threads(min(self.threads, len(self.worker_cpus)) if self.worker_cpus else self.threads)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Host memory for the offloaded tier (pinned on CUDA, so copies are real DMA)."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.cuda)

    def sync(self) -> None:
        """Wait for the compute queued by the calling thread (its current stream). Copies in
        flight on the copy streams are not waited for: a token ends when its compute does."""
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def sync_all(self) -> None:
        """Wait for everything queued on the device, copies included (set-up, before a clock starts)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def warm_copy_thread(self) -> None:
        """CUDA: a copy thread's first copy makes its stream and events; done before any clock starts."""
        if self.cuda:
            with torch.cuda.stream(self.thread_copy_stream()):
                torch.empty(1, device=self.device).copy_(torch.zeros(1, pin_memory=True), non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
            ev.synchronize()

    def thread_copy_stream(self):
        """CUDA: the calling copy thread's own stream, made on first use, so that `channels`
        copy threads copy concurrently and one's waits never hold up another's copies."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream

    def describe(self) -> str:
        if self.cuda:
            return f"cuda: {torch.cuda.get_device_name(0)}"
        return f"cpu: {cpu_name()}, {os.cpu_count()} logical CPUs, {self.threads} compute thread(s)"

    def memory_bytes(self) -> float:
        if self.cuda:
            return float(torch.cuda.get_device_properties(0).total_memory)
        return float(meminfo()["MemTotal"])


def cpu_split(threads: int) -> tuple[set[int] | None, set[int] | None]:
    """(main thread CPUs, worker CPUs), or (None, None) with fewer than two CPUs (or no affinity API)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, None
    if len(cpus) < 2:
        return None, None
    main = set(cpus[: min(threads, len(cpus) - 1)])
    return main, set(cpus) - main


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (Linux); an empty dict elsewhere."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[name] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def check_memory(nbytes: float, what: str, device: bool = False) -> None:
    """Refuse to allocate more than 80% of the memory available (host, or the CUDA device's)."""
    avail = torch.cuda.mem_get_info()[0] if device else meminfo().get("MemAvailable")
    if avail is not None and nbytes > 0.8 * avail:
        raise UserError(f"{what} needs {nbytes / 1e9:.2f} GB of memory but only {avail / 1e9:.2f} GB is "
                        "available; use fewer cache.slots, fewer layers= or a smaller model preset")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
