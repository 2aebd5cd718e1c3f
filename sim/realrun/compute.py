"""Real compute: the slot pool, batch-1 SwiGLU experts, the non-expert stand-in, the CPU worker.

Kernels (what the engine calls; `wait(i)` blocks until matrix i of a loading expert is in, so a
pipelined expert starts each GEMM as soon as its matrix has arrived):

    expert(mats, weight, tokens, wait)   one routed expert on `tokens` rows; returns its output
    attention(layer, context, new)       the non-expert work of one layer (synthetic runs only)
    attention_batch(layer, pairs)        the same for a batch: each request's (context, new tokens)
    combine(outputs)                     the MoE block output from {key: expert output}

`RandomKernels` (synthetic runs): matrices gate [W, H], up [W, H], down [H, W]; the stand-in for
a layer's attention, router and norms is one GEMV over a weight of the preset's
`non_expert_bytes_per_layer` plus the KV cache bytes of the context (`sim/machine/cost.py` counts the
same bytes), one weight per layer so that it is read from memory, not from a CPU cache. A batch's
stand-in (a serving step) reads the weight part once for all the batch's new tokens and then each
request's KV part for its own new tokens, as `CostModel.batch_attention_work` counts.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sim.machine.models import ModelPreset
from sim.realrun.backend import Backend
from sim.realrun.store import Layout


class SlotPool:
    """`n` device buffers, each one expert's matrices: the cache slots plus the staging buffers."""

    def __init__(self, backend: Backend, layout: Layout, n: int):
        self.n = n
        # zero-filled, so every page is mapped now: a first copy into a fresh page would fault
        self.pools = [backend.empty((n, r, c), layout.torch_dtype).zero_() for r, c in layout.shapes]
        self.free = list(range(n - 1, -1, -1))

    def matrices(self, buf: int) -> list[torch.Tensor]:
        return [p[buf] for p in self.pools]

    def take(self) -> int:
        assert self.free, f"all {self.n} expert buffers are in use"
        return self.free.pop()

    def give(self, buf: int) -> None:
        self.free.append(buf)


def _no_wait(i: int) -> None:
    pass


class RandomKernels:
    """Synthetic runs: random weights of the preset's shapes; the outputs are thrown away."""

    def __init__(self, backend: Backend, preset: ModelPreset, dtype: torch.dtype, max_context: int,
                 max_batch_tokens: int = 1):
        """`max_context`: the longest context a layer attends over; `max_batch_tokens`: the most
        tokens one step computes (a serving run's `batch.max_tokens`; 1 for a decode-only replay)."""
        self.backend = backend
        H = preset.hidden
        item = torch.empty((), dtype=dtype).element_size()
        self.row_bytes = H * item
        self.base_bytes = preset.non_expert_bytes_per_layer
        self.kv_bytes = preset.kv_bytes_per_token_per_layer()
        rows = self.rows(max_context)
        g = torch.Generator().manual_seed(1)
        self.attn = [(torch.randn((rows, H), generator=g) * 0.02).to(dtype).to(backend.device)
                     for _ in range(preset.layers)]
        x = torch.randn((max(1, max_context, max_batch_tokens), H), generator=g).to(dtype)  # [tokens, H]
        self.x, self.x_host = x.to(backend.device), x
        self.act = F.silu

    def rows(self, context_tokens: int) -> int:
        return max(1, math.ceil((self.base_bytes + self.kv_bytes * context_tokens) / self.row_bytes))

    def attention(self, layer: int, context: int, new: int = 1) -> None:
        F.linear(self.x[:new], self.attn[layer][: self.rows(context + new)])

    def attention_batch(self, layer: int, pairs: list[tuple[int, int]]) -> None:
        """A batch's stand-in: the weight rows once over all its new tokens, then each request's
        KV rows (its context and new tokens) over its own new tokens."""
        w = self.attn[layer]  # [rows, H]
        base = self.rows(0)
        F.linear(self.x[: sum(n for _, n in pairs)], w[:base])
        for context, new in pairs:
            kv = self.rows(context + new) - base
            if kv > 0:
                F.linear(self.x[:new], w[base: base + kv])

    def expert(self, mats: list[torch.Tensor], weight: float, tokens: int = 1,
               wait: Callable[[int], None] = _no_wait) -> torch.Tensor:
        x = self.x[:tokens]
        wait(1)
        g = F.linear(x, mats[0])
        wait(2)
        h = self.act(g) * F.linear(x, mats[1])
        wait(3)
        return F.linear(h, mats[2]) * weight

    def cpu_expert(self, mats: list[torch.Tensor], weight: float, tokens: int = 1) -> torch.Tensor:
        """One expert computed by the CPU from its host-tier matrices (placement=cpu), on `tokens` rows."""
        x = self.x_host[:tokens]
        return F.linear(self.act(F.linear(x, mats[0])) * F.linear(x, mats[1]), mats[2]) * weight

    def combine(self, outputs: dict[int, torch.Tensor]) -> None:
        return None


class CpuWorker:
    """Experts placed on the CPU (Fiddler): computed by a thread from the host tier, in order.

    `submit(jobs)` queues a layer's CPU experts (each a zero-argument callable returning its
    output); `wait()` blocks until they are done and returns {key: output}."""

    def __init__(self, backend: Backend | None = None):
        self.backend = backend
        self.q: queue.Queue = queue.Queue()
        self.results: dict[int, torch.Tensor] = {}
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.done.set()
        self.busy_s = 0.0
        self.th = threading.Thread(target=self._loop, name="cpu-experts", daemon=True)
        self.th.start()

    def _loop(self) -> None:
        if self.backend is not None:
            try:
                self.backend.enter_worker_thread()
            except OSError:  # unpinned: slower hand-offs, still correct
                pass
        while True:
            jobs = self.q.get()
            if jobs is None:
                return
            try:
                for key, fn in jobs:
                    self.results[key] = fn()
            except BaseException as err:  # re-raised by wait()
                self.error = err
            self.done.set()

    def submit(self, jobs: list[tuple[int, Callable[[], torch.Tensor]]]) -> None:
        self.done.clear()
        self.results = {}
        self.q.put(jobs)

    def wait(self) -> dict[int, torch.Tensor]:
        while not self.done.wait(0.5):
            if not self.th.is_alive():
                raise RuntimeError("the CPU expert worker thread has ended; its experts never will")
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        return self.results

    def close(self) -> None:
        self.q.put(None)
        self.th.join(timeout=10)
