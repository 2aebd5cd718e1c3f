"""`phased`: one prefetch rule for a prompt's prefill, another for decode (DuoServe-MoE's split).

Source: DuoServe-MoE (Zhang et al., 2025): prefill activates most experts of every layer on the
prompt's many tokens, decode only a few per token, so the two phases get separate schedules. In
its prefill, a second CUDA stream copies the next layer's experts while the current layer runs;
in decode, an offline-trained predictor prefetches the likely experts.

Prefill (`on_prefill`, asked once per MoE layer l of a prompt's prefill batch, after the layer's
first demand loads): the experts of layer l + 1 (none after the last layer) ranked by how many of
the prompt's tokens run them, most first (ties: lower expert id), and the first `prefill_count`
of them (0: all) that are neither resident nor loading. Which experts and counts (`prefill_from`):
- `all` (the default): every expert of layer l + 1, in id order (DuoServe's dense prefill stream;
  no prediction);
- `routing`: the prompt's own routing at layer l + 1 (the gating plan's experts when the gating
  is stateless, else the trace's top-k): it reads one layer ahead, a perfect predictor, flagged in
  the summary as modelled (`prefetch_modelled`); in a prefill of tens of tokens nearly every
  expert runs, so it is close to `all`;
- `pregate`: each prompt token's top-k of `pregate_1[t, l]`, counted (needs `pregate_1`).
Prefill prefetches are issued as decode ones (the engine skips present ones; one refused is
skipped), under the same engine knobs. The default `admit=on_use` streams them through staging
buffers, as DuoServe streams prefill experts through transient memory: each is computed from its
buffer and enters the cache only when used, so it never evicts, before it has run, an expert the
prompt needs at that layer. With `admit=cache` a prefill prefetch takes a cache slot at once; in a
per-layer cache smaller than the prompt's union (the toy trace, 64 slots, lfu scope=layer) that
evicts experts the prompt is about to run (TTFT 0.653 s against 0.514 s without prefetch; 0.503 s
with on_use). With on_use, at most `engine.staging_buffers` prefetches wait at once (the others
are skipped).

Decode (`on_layer`, `on_batch`): delegated to the policy `decode` (pregate | learned | history |
none), built with its own default knobs except the pass-through ones it has: `depth`, `count`,
`fit` (learned), `window` (history), `predictor` (pregate). A decode policy's own engine knobs
are not used: the engine knobs of `phased` (`wait`, `admit`, `yield_to_demand`, `chunks`,
`idle_only`, as `pregate`'s, except that `admit` defaults to on_use) apply to both phases. A
modelled decode predictor (`pregate` on a trace without pre-gating) is flagged in the summary
as its own would be.

Simplified: no second stream is modelled (prefetches share the link with demand loads, at
prefetch priority, as every prefetch does); the memory limit DuoServe keeps in prefill is the
cache's. Errors (UserError, naming the knob): an unknown decode / prefill_from, prefill_count < 0,
`prefill_from=pregate` on a trace without `pregate_1`, and the decode policy's own errors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from policies.base import Context, PrefetchPolicy
from policies.prefetch.learned import EngineKnobs, apply_engine_knobs
from policies.prefetch.pick import first_absent
from policies.registry import PREFETCH
from sim.errors import UserError

DECODE = ("pregate", "learned", "history", "none")
PREFILL_FROM = ("all", "routing", "pregate")
#: the knobs of `phased` passed to the decode policy when it has them (all others keep its defaults)
PASS_THROUGH = ("depth", "count", "fit", "window", "predictor")


@PREFETCH.register("phased")
class Phased(PrefetchPolicy):
    @dataclass
    class Knobs(EngineKnobs):
        admit: str = "on_use"  # on_use (staging buffers; see the module docstring) | cache
        decode: str = "pregate"  # the decode policy: pregate | learned | history | none
        prefill_count: int = 0  # prefill: experts of layer l + 1 prefetched per layer, most tokens first (0: all)
        prefill_from: str = "all"  # all | routing (reads ahead: flagged modelled) | pregate (module docstring)
        depth: int = 1  # decode policy's depth (pregate, learned, history)
        count: int = 1  # decode policy's count per target layer
        fit: str = ""  # decode=learned: its profile trace (FIT_DIR)
        window: int = 16  # decode=history: tokens remembered
        predictor: str = "auto"  # decode=pregate: auto | trace | modelled

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        if knobs.decode not in DECODE:
            raise UserError(f"prefetch.decode must be one of {', '.join(DECODE)}, got {knobs.decode!r}")
        if knobs.prefill_from not in PREFILL_FROM:
            raise UserError(f"prefetch.prefill_from must be one of {', '.join(PREFILL_FROM)}, "
                            f"got {knobs.prefill_from!r}")
        if knobs.prefill_count < 0:
            raise UserError(f"prefetch.prefill_count must be >= 0, got {knobs.prefill_count}")
        tr = ctx.trace
        if knobs.prefill_from == "pregate" and 1 not in tr.pregate:
            raise UserError("prefetch.prefill_from=pregate needs the trace column pregate_1, which this trace "
                            "lacks; use prefetch.prefill_from=all")
        apply_engine_knobs(self, knobs, ctx)
        cls = PREFETCH.get(knobs.decode)
        have = {f.name for f in fields(cls.Knobs)} if getattr(cls, "Knobs", None) else set()
        values = {k: getattr(knobs, k) for k in PASS_THROUGH if k in have}
        self.decoder: PrefetchPolicy = cls(PREFETCH.knobs(knobs.decode, values), ctx)
        self.prefetches_in_prefill = True
        self.modelled = self.decoder.modelled
        if hasattr(self.decoder, "modelled_assumption"):
            self.modelled_assumption = self.decoder.modelled_assumption
        if knobs.prefill_from == "routing":  # a perfect prefill predictor: the next layer's true routing
            self.modelled = True
            self.modelled_assumption = "; ".join(
                a for a in (getattr(self, "modelled_assumption", ""), "prefetch.prefill_from=routing: prefill "
                            "prefetches read the prompt's true routing one layer ahead (a perfect predictor)") if a)
        L, E, k = ctx.layers, ctx.experts, ctx.top_k
        if knobs.prefill_from == "pregate":
            ids = np.argsort(-tr.pregate[1], axis=-1, kind="stable")[..., :k]  # [T, L, k] layer l + 1's, made at l
            ids[:, L - 1] = -1
        else:
            plan = ctx.gating_plan
            ids = np.full_like(tr.experts, -1, dtype=np.int64)
            ids[:, : L - 1] = (plan.ids if plan is not None else tr.experts)[:, 1:]  # row l: layer l + 1's experts
        self.next_ids = ids.astype(np.int64)  # [T, L, k]: the experts of layer l + 1 for prefill row l
        self._layers, self._experts = L, E

    def on_prefill(self, rows: list[int], layer: int) -> list[int]:
        target = layer + 1
        if target >= self._layers:
            return []
        E = self._experts
        base = target * E
        if self.knobs.prefill_from == "all":
            ranked = range(E)
        else:
            ids = self.next_ids[rows, layer].ravel()
            counts = np.bincount(ids[ids >= 0], minlength=E)
            ranked = [int(e) for e in np.argsort(-counts, kind="stable") if counts[e] > 0]
        n = self.knobs.prefill_count or E
        return first_absent((base + e for e in ranked), self.ctx.cache.is_present, n)

    def on_layer(self, t: int, layer: int) -> list[int]:
        return self.decoder.on_layer(t, layer)

    def on_batch(self, rows: list[int], layer: int) -> list[int]:
        return self.decoder.on_batch(rows, layer)
