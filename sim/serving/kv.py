"""The KV cache beside the expert cache: how device memory is split between them (`memory.*`).

A request holds `kv_bytes_per_token` for every position in its context (prompt and generated
tokens it has computed): `2 (K and V) x kv_heads x head_dim x kv_bits / 8` per MoE layer, times
the layers. The device memory left to the two caches is

    pool = device memory - resident (non-expert) weights - the profile's reserve

and the expert cache is `cache.slots` / `cache.bytes` (or the hardware budget) of it:

- `memory.kv=static` (default): a fixed split. KV gets `memory.kv_bytes` (default: the pool minus
  the expert cache); the expert cache keeps its slots. A request that cannot grow is preempted.
- `memory.kv=shared`: KV and experts share `expert cache + memory.kv_bytes`; as KV grows the
  expert cache shrinks (its policy evicts, `sim.engine.ledger.Ledger.resize_cache`), never below
  one layer's top-k experts; as requests finish it grows back.

States: `used_bytes` (the KV of the admitted requests) <= `capacity_bytes` always (checked).
Errors (`UserError`, one line): an unknown `memory.kv`, a budget <= 0, a budget that cannot hold
the longest request's context (the bytes named).
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.errors import UserError


@dataclass
class MemoryOptions:
    kv: str = "static"  # static (a fixed KV budget; the expert cache keeps its slots) or shared (KV takes expert-cache memory as it grows)
    kv_bytes: float | None = None  # KV budget in bytes (default: device memory left by the resident weights and the expert cache)
    kv_bits: float = 16.0  # bits per KV cache element


class KvBudget:
    """KV bytes held by admitted requests against their budget; in `shared` mode it also says how
    much of the pool the expert cache may use."""

    def __init__(self, opts: MemoryOptions, preset, hw, cache_bytes: float, longest_context: int):
        if opts.kv not in ("static", "shared"):
            raise UserError(f"memory.kv must be static or shared, got {opts.kv!r}")
        if opts.kv_bits <= 0:
            raise UserError(f"memory.kv_bits must be > 0, got {opts.kv_bits}")
        self.shared = opts.kv == "shared"
        self.bytes_per_token = preset.kv_bytes_per_token_per_layer(opts.kv_bits) * preset.layers
        if opts.kv_bytes is not None:
            kv_budget = float(opts.kv_bytes)
            said = f"memory.kv_bytes={kv_budget:.0f}"
        else:
            pool = hw.device_memory_bytes - preset.non_expert_bytes - hw.memory_reserve_bytes
            kv_budget = pool - cache_bytes
            said = (f"{hw.name}'s {hw.device_memory_bytes / 1e9:.1f} GB less {preset.non_expert_bytes / 1e9:.2f} GB of "
                    f"resident weights, the {hw.memory_reserve_bytes / 1e9:.2f} GB reserve and the "
                    f"{cache_bytes / 1e9:.2f} GB expert cache")
        self.cache_bytes = float(cache_bytes)
        self.kv_budget = kv_budget
        self.min_cache_bytes = preset.top_k * preset.expert_bytes  # one layer's experts
        self.capacity_bytes = kv_budget + (cache_bytes - self.min_cache_bytes if self.shared else 0.0)
        need = longest_context * self.bytes_per_token
        if kv_budget <= 0 or need > self.capacity_bytes:
            raise UserError(
                f"the KV cache cannot hold one request's context: the longest request needs {need:.0f} B "
                f"({longest_context} tokens x {self.bytes_per_token:.0f} B), the budget is "
                f"{max(self.capacity_bytes, 0.0):.0f} B ({said}{', shared with the expert cache' if self.shared else ''}); "
                f"give memory.kv_bytes=B, a smaller cache.slots, or workload.max_prompt / workload.max_output")
        self.used_bytes = 0.0
        self.peak_bytes = 0.0

    def fits(self, tokens: int) -> bool:
        """`tokens` more positions of KV fit now."""
        return self.used_bytes + tokens * self.bytes_per_token <= self.capacity_bytes * (1 + 1e-12)

    def take(self, tokens: int) -> None:
        self.used_bytes += tokens * self.bytes_per_token
        assert self.used_bytes <= self.capacity_bytes * (1 + 1e-12), (
            f"KV cache over its budget: {self.used_bytes:.0f} > {self.capacity_bytes:.0f} B")
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def give(self, tokens: int) -> None:
        self.used_bytes -= tokens * self.bytes_per_token
        assert self.used_bytes >= -1e-6, f"KV cache freed more than it held ({self.used_bytes:.0f} B)"
        self.used_bytes = max(self.used_bytes, 0.0)

    def expert_cache_bytes(self) -> float:
        """What the expert cache may use now: its own size (static), or its size less the KV held
        beyond the KV budget (shared; never below one layer's top-k experts)."""
        if not self.shared:
            return self.cache_bytes
        return self.cache_bytes - max(0.0, self.used_bytes - self.kv_budget)
