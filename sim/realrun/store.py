"""The offloaded tier: every expert's matrices, on disk (safetensors) or in host memory.

An expert is `len(layout.shapes)` matrices copied in order (per-matrix pipelining computes each
GEMM as soon as its matrix is in). Keys are `layer * experts + expert`, as in the simulator.

`DiskStore`: one safetensors file per layer (`layer000.safetensors`, tensors `e<j>.m<i>`) plus a
`manifest.json` written last (a folder without it is incomplete and is rebuilt). Before each read
the expert's byte ranges are dropped from the page cache with `posix_fadvise(DONTNEED)` (no root
needed), so every load really reads the disk, and dropped again after the read, so that the page
cache never holds expert data between loads (otherwise the next load of that expert would pay for
freeing those pages, a cost that depends on the history); readahead is off (`FADV_RANDOM`), so a
load reads exactly its expert. `page_cache_check` verifies by timing that a re-read is cold.
`HostStore`: tensors in host memory (pinned on CUDA).

`read_into(key, dests, ...)` is what the copy worker runs: it fills the destination slot's
matrices in order, calls `progress(i)` after matrix i, and stops early (returning False) when
`cancelled()` turns true between chunks of `chunk_bytes`. A tiered run (`sim/realrun/tiers.py`)
reads the disk into host buffers instead (`DiskStore.read_into(..., into_host=True)`: straight
into the given host tensors, no bounce buffer on CUDA), then copies those into device slots.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sim import atomic
from sim.errors import UserError
from sim.realrun.backend import Backend

MANIFEST = "manifest.json"
NOTICE_BYTES = 100e6  # a store at least this large is announced on stderr (where, how many GB) before it is written
STORE_FORMAT = 1
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.uint8: "uint8"}  # uint8: packed low-bit copies (`sim/realrun/low.py`)


@dataclass(frozen=True)
class Layout:
    """Shapes of the offloaded experts: `layers x experts`, each the matrices `shapes` in order."""

    layers: int
    experts: int
    shapes: tuple[tuple[int, int], ...]
    dtype: str  # float32 | bfloat16 | float16

    @property
    def torch_dtype(self) -> torch.dtype:
        return {v: k for k, v in DTYPE_NAMES.items()}[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def matrix_bytes(self) -> list[int]:
        return [r * c * self.itemsize for r, c in self.shapes]

    @property
    def expert_bytes(self) -> int:
        return sum(self.matrix_bytes)

    @property
    def total_bytes(self) -> int:
        return self.layers * self.experts * self.expert_bytes


Fill = Callable[[int], list[torch.Tensor]]  # layer -> its experts' matrices, expert-major


def random_fill(layout: Layout, seed: int) -> Fill:
    """Random weights (timing only): N(0, 0.02^2), one generator per layer, seeded."""

    def fill(layer: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 100_003 + layer)
        return [(torch.randn(shape, generator=g) * 0.02).to(layout.torch_dtype)
                for _ in range(layout.experts) for shape in layout.shapes]

    return fill


def _chunks(nbytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    step = nbytes if chunk_bytes <= 0 else max(1, int(chunk_bytes))
    for lo in range(0, nbytes, step):
        yield lo, min(nbytes, lo + step)


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class Store:
    """Base: `read_into` fills a slot (a list of device tensors, one per matrix)."""

    kind = "?"

    def __init__(self, layout: Layout, backend: Backend):
        self.layout, self.backend = layout, backend
        self.reads = 0

    def read_into(self, key: int, dests: list[torch.Tensor], progress: Callable[[int], None] | None = None,
                  cancelled: Callable[[], bool] | None = None, chunk_bytes: float = 0,
                  on_bytes: Callable[[int], None] | None = None) -> bool:
        """Copy expert `key` into `dests`; `progress(i)` after its i-th matrix, `on_bytes(n)` after each
        chunk of n bytes, `cancelled()` asked before each chunk (True: stop, return False)."""
        raise NotImplementedError

    def host_matrices(self, key: int) -> list[torch.Tensor]:
        """The expert's matrices where the CPU can compute on them (host tier only)."""
        raise UserError(f"experts kept on {self.kind} cannot be computed on the CPU in place: "
                        "placement cpu_on_miss / cost_based needs store=host (where Fiddler keeps experts)")

    def close(self) -> None:
        pass

    def _device_copy(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        device_copy(self.backend, dest, src)


def device_copy(backend: Backend, dest: torch.Tensor, src: torch.Tensor) -> None:
    """src (host) -> dest (a slot); on CUDA on the calling thread's copy stream, waited for before returning."""
    if backend.cuda:
        with torch.cuda.stream(backend.thread_copy_stream()):
            dest.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        ev.synchronize()
    else:
        dest.copy_(src)


class HostStore(Store):
    kind = "host"

    def __init__(self, layout: Layout, backend: Backend, fill: Fill):
        super().__init__(layout, backend)
        self.tensors: list[list[torch.Tensor]] = []
        n = len(layout.shapes)
        for layer in range(layout.layers):
            mats = fill(layer)
            for e in range(layout.experts):
                row = []
                for i, shape in enumerate(layout.shapes):
                    t = backend.host_empty(shape, layout.torch_dtype)
                    t.copy_(mats[e * n + i])
                    row.append(t)
                self.tensors.append(row)

    def host_matrices(self, key: int) -> list[torch.Tensor]:
        return self.tensors[key]

    def close(self) -> None:
        self.tensors = []  # host (pinned on CUDA) memory back now, not at the next garbage collection

    def read_into(self, key, dests, progress=None, cancelled=None, chunk_bytes=0, on_bytes=None) -> bool:
        self.reads += 1
        for i, (dst, src) in enumerate(zip(dests, self.tensors[key], strict=True)):
            d, s = _bytes_view(dst), _bytes_view(src)
            for lo, hi in _chunks(d.numel(), chunk_bytes):
                if cancelled is not None and cancelled():
                    return False
                self._device_copy(d[lo:hi], s[lo:hi])
                if on_bytes is not None:
                    on_bytes(hi - lo)
            if progress is not None:
                progress(i + 1)
        return True


class DiskStore(Store):
    kind = "disk"

    def __init__(self, folder: Path, layout: Layout, backend: Backend):
        super().__init__(layout, backend)
        self.folder = Path(folder)
        self.fds: list[int] = []
        self.offsets: list[list[tuple[int, int]]] = []  # key -> [(file offset, nbytes)] per matrix
        n = len(layout.shapes)
        for layer in range(layout.layers):
            path = self.folder / f"layer{layer:03d}.safetensors"
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: read exactly the expert
            self.fds.append(fd)
            header = _header(fd)
            for e in range(layout.experts):
                self.offsets.append([header[f"e{e}.m{i}"] for i in range(n)])
        self._local = threading.local()  # CUDA: disk -> pinned bounce buffers (per copy thread) -> device

    def drop(self) -> None:
        """Drop every expert file from the page cache."""
        for fd in self.fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read_into(self, key, dests, progress=None, cancelled=None, chunk_bytes=0, on_bytes=None,
                  drop: bool = True, into_host: bool = False) -> bool:
        """`Store.read_into`; `into_host`: `dests` are host tensors (a tiered run's host buffers), filled
        straight from the file (else, on CUDA, through this thread's pinned bounce buffers)."""
        self.reads += 1
        fd = self.fds[key // self.layout.experts]
        bounce = self._bounce() if self.backend.cuda and not into_host else None
        for i, (dst, (off, nbytes)) in enumerate(zip(dests, self.offsets[key], strict=True)):
            if drop:
                os.posix_fadvise(fd, off, nbytes, os.POSIX_FADV_DONTNEED)
            host = bounce[i] if bounce is not None else _bytes_view(dst)
            buf = host.numpy()
            for lo, hi in _chunks(nbytes, chunk_bytes):
                if cancelled is not None and cancelled():
                    return False
                got = os.preadv(fd, [memoryview(buf[lo:hi])], off + lo)
                if got != hi - lo:
                    raise OSError(f"short read of expert {key} from {self.folder}: {got} of {hi - lo} bytes")
                if on_bytes is not None and bounce is None:
                    on_bytes(hi - lo)
            if drop:  # and out again, so the page cache never keeps expert data between loads
                os.posix_fadvise(fd, off, nbytes, os.POSIX_FADV_DONTNEED)
            if bounce is not None:
                self._device_copy(_bytes_view(dst), host)
                if on_bytes is not None:
                    on_bytes(nbytes)
            if progress is not None:
                progress(i + 1)
        return True

    def _bounce(self) -> list[torch.Tensor]:
        if getattr(self._local, "bufs", None) is None:
            self._local.bufs = [self.backend.host_empty((nb,), torch.uint8) for nb in self.layout.matrix_bytes]
        return self._local.bufs

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def page_cache_check(self, key: int, dests: list[torch.Tensor]) -> dict[str, float]:
        """Time a cold read, a warm re-read (the page cache kept this time) and a cold re-read as
        realrun does it (dropped first): the last must not be a page-cache hit."""
        out = {}
        for name, drop in (("cold_s", True), ("fill", False), ("warm_s", False), ("cold_again_s", True)):
            t0 = time.perf_counter()
            self.read_into(key, dests, drop=drop)
            self.backend.sync_all()
            out[name] = time.perf_counter() - t0
        del out["fill"]
        self.reads -= 4
        out["not_a_page_cache_hit"] = bool(out["cold_again_s"] > 1.5 * out["warm_s"])
        return out


def _header(fd: int) -> dict[str, tuple[int, int]]:
    """safetensors header -> {name: (absolute file offset, nbytes)}."""
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    meta = json.loads(os.pread(fd, n, 8))
    return {name: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for name, v in meta.items() if name != "__metadata__"}


def open_disk_store(folder: Path, layout: Layout, backend: Backend, fill: Fill, fill_id: str,
                    progress: bool = True) -> DiskStore:
    """The store in `folder`, written first if missing or different (space checked before writing)."""
    folder = Path(folder)
    # as JSON reads it back (tuples become lists): compared raw, every open rewrote the store
    want = json.loads(json.dumps({"format": STORE_FORMAT, "layout": asdict(layout), "fill": fill_id}))
    man = folder / MANIFEST
    try:
        have = json.loads(man.read_text()) if man.is_file() else None
    except (OSError, ValueError):
        have = None
    if have != want:
        write_disk_store(folder, layout, fill, want, progress)
    store = DiskStore(folder, layout, backend)
    store.drop()
    return store


def check_store_folder(folder: Path, need_bytes: float) -> None:
    """UserError unless `folder` can be created, is writable and has room for `need_bytes` (+ 5%)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise UserError(f"store folder {folder} is not writable: {err.strerror or err}") from None
    free = shutil.disk_usage(folder).free
    if need_bytes * 1.05 > free:
        raise UserError(f"store folder {folder} has {free / 1e9:.2f} GB free but the experts need "
                        f"{need_bytes / 1e9:.2f} GB; choose another store_dir= or a smaller model/layers=")


def write_disk_store(folder: Path, layout: Layout, fill: Fill, manifest: dict, progress: bool = True) -> None:
    from safetensors.torch import save_file
    from tqdm import tqdm

    check_store_folder(folder, layout.total_bytes)
    if layout.total_bytes >= NOTICE_BYTES:  # say where the gigabytes go before writing them
        print(f"writing the expert store: {layout.total_bytes / 1e9:.2f} GB to {folder} "
              "(written once, reused by later runs; store_dir= to put it elsewhere)", file=sys.stderr, flush=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    n = len(layout.shapes)
    for layer in tqdm(range(layout.layers), desc="write expert store", unit="layer",
                      disable=None if progress else True):
        mats = fill(layer)
        tensors = {f"e{e}.m{i}": mats[e * n + i].contiguous() for e in range(layout.experts) for i in range(n)}
        path = folder / f"layer{layer:03d}.safetensors"
        tmp = folder / f".{path.name}.tmp"
        try:
            save_file(tensors, str(tmp))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # written back, so DONTNEED can drop the pages
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write the expert store in {folder}: {err.strerror or err}") from None
    atomic.write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
