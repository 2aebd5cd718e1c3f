"""The four policy interfaces, the contract between them and the engine, and the context they read.

Call order per decoded token t and MoE layer l (the engine's, `sim/engine/step.py`):
1. `GatingPolicy` chooses the experts to run and their weights, with its estimated loss
   increase `dL` (0 for the model's own top-k). Stateless policies precompute every decision
   at once in `plan()`; stateful ones (that look at the cache) answer `decide(t, l)`.
2. `PlacementPolicy.place()` for each active expert that is not on the device: load it, load a
   low-precision copy, or compute it on the CPU.
3. `PrefetchPolicy.on_layer(t, l)` names experts (keys `layer * E + expert`) to load for later
   layers, using only what is known at this point (this row's pre-gating logits, the past).
   During a prompt's prefill (one batch per layer over its tokens) it is `on_prefill(rows, l)`
   instead, asked once per layer once the layer's loads are all issued.
4. `CachePolicy.victims()` picks residents to evict when a load needs room; it is told of every
   access, insertion and eviction, and (if it sets `observes_steps`) of each step's rows at a
   layer, `on_step(rows, l)`, once the layer has gated and before its loads.

The contract: policies decide and the engine acts. Everything a policy asks of the engine beyond
its return values is a field declared on its base class below, with a default that asks for
nothing; the engine reads those fields and nothing else. Policies never touch SimPy or mutate
the cache; they read `ctx.cache` through its public methods and return decisions. The step being
simulated is passed to them (token `t`, `layer`), never written into the context. Tie-breaks are
documented in each policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sim.engine.cache import ExpertCache
from sim.errors import UserError
from sim.machine.models import ModelPreset
from sim.trace.format import Trace


@dataclass
class GatingPlan:
    """Every (token, layer) decision at once. ids [T, L, k] (-1 = not run), weights, dL [T, L]."""

    ids: np.ndarray
    weights: np.ndarray
    dL: np.ndarray


@dataclass
class Context:
    """What a policy may read. Arrays are the trace's; treat everything as read-only."""

    trace: Trace
    preset: ModelPreset
    cache: ExpertCache  # read it, never mutate it
    capacity_slots: int  # cache capacity in experts of the preset's size
    rng: np.random.Generator
    hw: object | None = None  # sim.machine.hardware.HardwareProfile (for cost-aware policies)
    cost: object | None = None  # sim.machine.cost.CostModel
    gating_plan: GatingPlan | None = None  # the gating policy's decisions when stateless (set first)
    prefill: bool = True  # the replay simulates each prompt's prefill (`engine.prefill`)
    max_tokens: int = 0  # the replay stops after this many decode tokens (0: all; `engine.max_tokens`)
    staging_buffers: int = 6  # transient buffers for loads that take no cache slot (`engine.staging_buffers`)
    _steps: object | None = field(default=None, repr=False, compare=False)

    def steps(self):
        """The replay as steps with the keys each needs (`sim.offline.steps.Steps`), built on first
        use: from the gating plan when the gating policy is stateless, else from the trace's top-k
        (the experts a stateful gating runs are only known as it runs)."""
        if self._steps is None:
            from sim.offline.steps import build_steps

            ids = self.gating_plan.ids if self.gating_plan is not None else self.trace.experts.astype(np.int64)
            self._steps = build_steps(self.trace, ids, prefill=self.prefill, max_tokens=self.max_tokens)
        return self._steps

    @property
    def layers(self) -> int:
        return self.trace.model.layers

    @property
    def experts(self) -> int:
        return self.trace.model.experts

    @property
    def top_k(self) -> int:
        return self.trace.model.top_k


class GatingPolicy:
    """Chooses which experts run. Override `plan` (stateless) or `decide` (stateful)."""

    name = "?"
    #: the policy reads the trace's gating weights (not only the expert ids): it is refused on a
    #: trace that does not record them (a vLLM log: `sim.trace.import_vllm.check_weights_recorded`)
    reads_weights = False

    def __init__(self, knobs: object, ctx: Context):
        self.knobs = knobs
        self.ctx = ctx

    def plan(self) -> GatingPlan | None:
        """All decisions up front, or None if decisions depend on run-time state."""
        return None

    def decide(self, t: int, layer: int) -> tuple[list[int], list[float], float]:
        """(expert ids, weights, dL) for token t at `layer`; only called when `plan()` is None."""
        raise NotImplementedError

    def bound_plan(self) -> GatingPlan:
        """The experts this policy runs in every run, whatever the cache holds (ids -1 elsewhere;
        weights and dL unused): its plan when stateless. The lower bound on TPOT is computed on
        these (`sim/offline/lower_bound.py`); a stateful policy overrides it."""
        plan = self.plan()
        if plan is None:
            raise NotImplementedError(f"gating policy {self.name!r} is stateful and names no bound plan")
        return plan


class PrefetchPolicy:
    """Names experts to load ahead of need. Default: none.

    What it may ask of the engine (fields; a subclass sets them in `__init__`):"""

    name = "?"
    #: a layer waits for the in-flight prefetches aimed at it, used or not (AdapMoE's released code)
    wait_for_prefetch: bool = False
    #: every prefetch goes to a staging buffer and enters the cache only when used; a wrong one is
    #: dropped with its buffer (AdapMoE's `admit=on_use`)
    admit_on_use: bool = False
    #: a prefetch is issued only onto an idle channel; one that would queue is skipped
    idle_only: bool = False
    #: > 0: prefetches are copied in chunks of this many bytes, and a demand load that finds every
    #: channel busy cuts the running prefetch that frees one soonest at its next chunk boundary
    yield_chunk_bytes: float = 0.0
    #: stop issuing this layer's prefetches at the first one the engine refuses
    stop_at_first_skip: bool = False
    #: a prefetch the cache policy finds no slot for goes to a free staging buffer (held until its
    #: use, then dropped) instead of being skipped
    stage_without_slot: bool = False
    #: an offline schedule whose evictions the cache policy must follow (`CachePolicy.follow`), or None
    schedule: object | None = None
    #: predictions are modelled, not read from the trace (flagged in the summary)
    modelled: bool = False
    #: the engine asks `on_prefill` in a prefill batch (a policy that leaves it False is simulated
    #: as if prefill had no prefetch hook: its prefetch counters untouched by prefill steps)
    prefetches_in_prefill: bool = False
    #: it plans on the replay's order of steps (`Context.steps`, an offline schedule): valid for
    #: `workload.kind=replay` only (a serving run, whose order the scheduler decides, refuses it)
    reads_replay_future: bool = False

    def __init__(self, knobs: object, ctx: Context):
        self.knobs = knobs
        self.ctx = ctx

    def on_layer(self, t: int, layer: int) -> list[int]:
        """Keys to prefetch after layer `layer` of token t has gated. Present ones are skipped."""
        return []

    def on_prefill(self, rows: list[int], layer: int) -> list[int]:
        """Keys to prefetch after layer `layer` of a prefill batch (the prompt tokens `rows`, trace
        indices) has gated: asked once per layer of a prompt's prefill, and of a serving step that
        holds only prompt chunks, once the layer's demand loads are all issued; issued as decode
        prefetches are (present ones skipped, in order), using only what is known then (the prompt's
        routing up to this layer, its pre-gating logits, the past). Default: none. The engine asks
        only a policy that sets `prefetches_in_prefill`."""
        return []

    def on_batch(self, rows: list[int], layer: int) -> list[int]:
        """Keys to prefetch after layer `layer` of a batched step whose decode tokens are `rows`
        (serving). Default: what `on_layer` names for each token, each key once, in the order
        first named (batch-unaware; `pregate_union` ranks by the tokens that need each)."""
        if len(rows) == 1:
            return self.on_layer(rows[0], layer)
        return list(dict.fromkeys(k for t in rows for k in self.on_layer(t, layer)))


class CachePolicy:
    """Chooses eviction victims. Keys are `layer * E + expert`."""

    name = "?"
    #: it reads the replay's future (`Context.steps`): `workload.kind=replay` only (as `PrefetchPolicy`'s)
    reads_replay_future: bool = False
    #: non-empty: what it measured on the replayed trace itself (e.g. "cache.profile: the replayed
    #: trace"), an in-sample choice that has seen the future; said in the summary's `in_sample_fit`
    in_sample_fit: str = ""
    #: the engine tells it of each step's rows at each layer (`on_step`); False: never called
    observes_steps: bool = False

    def __init__(self, knobs: object, ctx: Context):
        self.knobs = knobs
        self.ctx = ctx

    def warm_start(self) -> list[int]:
        """Experts resident before the first token (default: none)."""
        return []

    def on_step(self, rows: list[int], layer: int) -> None:
        """The trace rows a step runs at `layer` -- one decode token, a prompt's prefill batch or
        chunk, or a serving step's prompt chunks and decode rows (in the step's order; read-only)
        -- told once per (step, layer) after the layer has gated and before any of its loads or
        accesses (so before any `victims` asked at that step and layer). Only called when
        `observes_steps` is True. Default: nothing."""

    def on_access(self, key: int, t: int) -> None:
        """An active expert was used (hit or after its load)."""

    def on_insert(self, key: int, t: int) -> None:
        """A load for `key` took a slot (it is LOADING now)."""

    def on_evict(self, key: int) -> None:
        """`key` left the cache."""

    def follow(self, schedule) -> None:
        """Evict as the prefetch policy's offline `schedule` planned (`sim.offline.schedule`)."""
        raise UserError(f"the prefetch policy plans its own evictions, which cache policy {self.name!r} cannot "
                        f"follow; use cache.name=belady")

    def victims(self, key: int, nbytes: float, t: int, layer: int, demand: bool = True) -> list[int] | None:
        """Residents to evict so that `key` (nbytes) fits, asked at step (token t, `layer`); [] if it
        fits; None if it cannot now.

        Only `ctx.cache.evictable(k)` experts may be named. `demand` is False for a prefetch
        (None then means: skip it), True for a demand load (None: use a staging buffer)."""
        raise NotImplementedError


class HostCachePolicy:
    """Chooses what the host-DRAM expert cache of a tiered run keeps (`host_cache.name`, docs/tiers.md).

    The engine's `sim.engine.host.HostCache` holds which experts are in host memory; this policy
    only orders them. It is told of every host access (a device load or a CPU job that needs the
    expert: `on_access`), of every expert read into host memory (`on_insert`) and of every
    eviction (`on_evict`); `victim` names the resident expert to evict for a read, or None to
    read the expert through a bounce buffer without caching it. Keys are `layer * E + expert`;
    `t` is the trace row of the step that asked."""

    name = "?"
    #: non-empty: what it measured on the replayed trace itself (said in the summary's `in_sample_fit`)
    in_sample_fit: str = ""
    #: it reads the replay's future (the trace order): `workload.kind=replay` only
    reads_replay_future: bool = False

    def __init__(self, slots: int, ctx: Context):
        self.slots = slots
        self.ctx = ctx

    def warm_start(self) -> list[int]:
        """Experts in host memory before the first token (at most `slots`; default: none)."""
        return []

    def on_access(self, key: int, t: int) -> None:
        """`key` was needed from host memory (in it, being read into it, or about to be read)."""

    def on_insert(self, key: int, t: int) -> None:
        """A read of `key` into host memory took a slot."""

    def on_evict(self, key: int) -> None:
        """`key` left host memory."""

    def victim(self, t: int, evictable) -> int | None:
        """A resident expert to evict so that a read can take its slot (`evictable(key)` is True
        for it), or None: the read goes through a bounce buffer and is not cached."""
        raise NotImplementedError


LOAD, CPU, LOW = "load", "cpu", "low"


class PlacementPolicy:
    """Where a missed expert runs: LOAD it to the device (default), compute it on the CPU, or LOW."""

    name = "?"
    always_load = False  # True lets the engine skip the call on its hot path
    reads_weights = False  # as `GatingPolicy.reads_weights` (a placement deciding by an expert's weight)

    def __init__(self, knobs: object, ctx: Context):
        self.knobs = knobs
        self.ctx = ctx

    low_bytes: float = 0.0  # bytes of a low-precision copy (policies that may return LOW)
    #: device bytes the placement keeps for itself, taken from the expert cache before any cache or
    #: prefetch policy is built (e.g. `partial_experts`' resident top slices); the run's
    #: `cache_slots` / `cache_bytes` are what is left
    reserved_bytes: float = 0.0
    may_use_cpu = False  # True if `place` may return CPU (the lower bound then lets misses run there)
    #: it reads the trace's rows in the replay's order (e.g. usage counts of the rows before t), which
    #: are the run's past only in the replay: a serving workload refuses it (as `CachePolicy`'s)
    reads_replay_future: bool = False
    in_sample_fit: str = ""  # as `CachePolicy.in_sample_fit`

    def place(self, key: int, t: int, weight: float) -> str:
        """LOAD (bring to the device), CPU (compute in host memory) or LOW (load a low-precision copy)."""
        return LOAD

    def dL(self, layer: int, weight: float) -> float:
        """Estimated loss increase of running an expert as a LOW copy."""
        return 0.0
