"""Low-precision copies of the experts, for placement `low_precision_on_miss` (HOBBIT) in the real run.

The simulator moves `placement.low_bytes` for a low-precision load: the expert's parameters at
`low_bits` each (the preset's `expert_bytes` at those bits; realrun's presets have no quantisation
groups). The real run moves exactly those bytes: each matrix [rows, cols] is quantised per row
(asymmetric min-max, 2^bits levels) and packed, 8 / bits codes per byte, into a uint8 matrix
[rows, cols * bits / 8]; the packed copies live in a store of their own (host memory or disk, as
the full-precision store), and the per-row offsets and steps (8 bytes a row) stay on the device
for every expert, so they are not part of a load. A load copies the packed matrices into a buffer
of a small pool of its own (one per staging buffer, and as many spare); the compute unpacks and
dequantises them on the device, then runs the expert as usual.

Only `low_bits` of 1, 2, 4 or 8 are packed (a code never straddles a byte); other values are
refused with a clear error, as are column counts not divisible by 8 / bits.
"""

from __future__ import annotations

import torch

from sim.errors import UserError
from sim.realrun.backend import Backend
from sim.realrun.compute import SlotPool
from sim.realrun.store import Fill, HostStore, Layout

PACKED_BITS = (1, 2, 4, 8)


def low_bits_of(placement) -> int:
    """The placement's `low_bits` as a packable integer, or a UserError."""
    bits = float(placement.knobs.low_bits)
    if bits not in PACKED_BITS:
        raise UserError(f"realrun packs low-precision copies at 1, 2, 4 or 8 bits; placement.low_bits={bits:g}")
    return int(bits)


def quantise(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes [rows, cols * bits / 8] uint8, per-row offset [rows], per-row step [rows]) of
    `x` [rows, cols]: code = round((x - offset) / step) in [0, 2^bits - 1]."""
    x = x.float()
    rows, cols = x.shape
    per = 8 // bits
    lo, hi = x.min(dim=1).values, x.max(dim=1).values
    step = ((hi - lo) / (2 ** bits - 1)).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round((x - lo[:, None]) / step[:, None]).clamp_(0, 2 ** bits - 1).to(torch.uint8)
    q = q.view(rows, cols // per, per)
    packed = torch.zeros((rows, cols // per), dtype=torch.uint8)
    for j in range(per):
        packed |= q[:, :, j] << (bits * j)
    return packed, lo, step


def dequantise(packed: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The matrix [rows, cols] of `quantise`'s output, in `dtype` (on the packed tensor's device)."""
    per, mask = 8 // bits, (1 << bits) - 1
    codes = torch.stack([(packed >> (bits * j)) & mask for j in range(per)], dim=-1)  # [rows, cols/per, per]
    codes = codes.reshape(packed.shape[0], -1).float()  # [rows, cols]
    return (codes * step[:, None] + lo[:, None]).to(dtype)


class LowCopies:
    """The packed low-bit copies of every expert: their store, their device scales, their buffers."""

    def __init__(self, layout: Layout, packed_layout: Layout, bits: int, store, scales, backend: Backend,
                 buffers: int):
        self.layout, self.packed_layout, self.bits = layout, packed_layout, bits
        self.store = store
        self.lo, self.step = scales  # per matrix: [keys, rows] float32 on the device
        self.nbytes = float(packed_layout.expert_bytes)
        self.pool = SlotPool(backend, packed_layout, buffers)

    @classmethod
    def build(cls, layout: Layout, placement, backend: Backend, fill: Fill, *, staging: int, store_kind: str = "host",
              store_dir: str = "", tag: str = "", progress: bool = False) -> LowCopies:
        bits = low_bits_of(placement)
        per = 8 // bits
        for _rows, c in layout.shapes:
            if c % per:
                raise UserError(f"realrun packs {per} low-bit codes per byte: a matrix of {c} columns does not "
                                f"divide (placement.low_bits={bits})")
        packed_layout = Layout(layout.layers, layout.experts, tuple((r, c // per) for r, c in layout.shapes), "uint8")
        if float(packed_layout.expert_bytes) != float(placement.low_bytes):
            raise UserError(f"a packed {bits}-bit copy is {packed_layout.expert_bytes} bytes but the simulator "
                            f"moves {placement.low_bytes:g} for it (the preset has quantisation groups or biases)")
        n = len(layout.shapes)
        packed: list[list[torch.Tensor]] = []  # layer -> its experts' packed matrices, expert-major
        lo = [[] for _ in range(n)]
        step = [[] for _ in range(n)]
        for layer in range(layout.layers):
            mats = fill(layer)
            row = []
            for e in range(layout.experts):
                for i in range(n):
                    p, a, b = quantise(mats[e * n + i], bits)
                    row.append(p)
                    lo[i].append(a)
                    step[i].append(b)
            packed.append(row)
        scales = ([torch.stack(x).to(backend.device) for x in lo], [torch.stack(x).to(backend.device) for x in step])
        if store_kind == "host":
            store = HostStore(packed_layout, backend, lambda layer: packed[layer])
        else:
            from sim.realrun.build import store_folder
            from sim.realrun.store import open_disk_store

            store = open_disk_store(store_folder(store_dir, f"{tag}-low{bits}"), packed_layout, backend,
                                    lambda layer: packed[layer], f"{tag} quantised to {bits} bits per row",
                                    progress=progress)
        return cls(layout, packed_layout, bits, store, scales, backend, 2 * staging)

    # ------------------------------------------------------------------ buffers
    def take(self) -> int:
        return self.pool.take()

    def give(self, buf: int) -> None:
        self.pool.give(buf)

    def packed(self, buf: int) -> list[torch.Tensor]:
        """Where a copy lands: the packed matrices of buffer `buf`."""
        return self.pool.matrices(buf)

    def matrices(self, buf: int, key: int) -> list[torch.Tensor]:
        """Expert `key`'s matrices dequantised from buffer `buf`, in the model's dtype."""
        dtype = self.layout.torch_dtype
        return [dequantise(p, self.lo[i][key], self.step[i][key], self.bits, dtype)
                for i, p in enumerate(self.pool.matrices(buf))]

    def close(self) -> None:
        self.store.close()
