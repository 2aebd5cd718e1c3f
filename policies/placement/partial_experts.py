"""`partial_experts`: keep the top slice of each hot expert resident; a miss loads only the rest (MoEpic).

MoEpic (2025) splits every expert into a top and a bottom segment and caches the top segments of
more experts than whole experts would fit, so that a miss of such an expert moves only its bottom
segment. Here: the `slice` share of each of the most used experts' bytes stays on the device for
the whole run (`reserved_bytes`, taken out of the expert cache before the cache policy sizes its
partitions: the run's `cache_slots` are what is left); a missed hot expert loads its remaining
`(1 - slice) * expert_bytes` into a staging buffer and runs (the engine's LOW path: not cached, no
loss, `dL = 0`); every other missed expert loads whole, into the cache, as with `load`.

The hot set: the experts used most often in the decode tokens of the profile trace (`fit=FIT_DIR`,
`policies.fit`; `fit=trace`: the replayed trace itself, an in-sample choice as `static`'s default,
said in the summary's `in_sample_fit`: give a fit part for a fair run), as many as `share` of the expert cache holds in slices
(`floor(share * cache_bytes / (slice * expert_bytes))`, at most every expert). Ties: lower layer,
then lower expert id.

Simplified relative to MoEpic: the split point is one fraction for every expert (MoEpic tunes the
segment sizes and the cache split with a search); a bottom segment is not cached and the expert's
compute starts when the bottom has arrived (MoEpic overlaps the top's compute with the bottom's
copy); the hot set is fixed for the run. In a batched serving step (several requests, or a prompt's
prefill) a miss loads the whole expert, as every low-copy placement's does there (the batched step
has no LOW path; docs/serving.md), so the slices pay off in batch-1 decode only. The real run does
not split experts: `realrun` refuses it.
Errors: `slice` or `share` outside (0, 1), a hot set that leaves fewer than top-k whole slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.base import LOAD, LOW, Context, PlacementPolicy
from policies.registry import PLACEMENT
from sim.errors import UserError


@PLACEMENT.register("partial_experts")
class PartialExperts(PlacementPolicy):
    @dataclass
    class Knobs:
        slice: float = 0.5  # share of a hot expert's bytes kept resident (its top slice)
        share: float = 0.5  # share of the expert cache given to the slices
        fit: str = "trace"  # profile trace folder for the hot set; `trace`: the replayed trace (in-sample)

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        for name in ("slice", "share"):
            if not 0.0 < getattr(knobs, name) < 1.0:
                raise UserError(f"placement.{name} must be in (0, 1), got {getattr(knobs, name)}")
        if knobs.fit == "trace":
            prof = ctx.trace
            self.in_sample_fit = "its hot set counted on the replayed trace (give placement.fit=FIT_DIR)"
        else:
            from policies.fit import fit_trace

            prof = fit_trace(knobs.fit, ctx, "placement.fit")
        L, E = ctx.layers, ctx.experts
        expert_bytes = float(ctx.preset.expert_bytes)
        slice_bytes = knobs.slice * expert_bytes
        n_hot = min(int(knobs.share * ctx.cache.capacity_bytes // slice_bytes), L * E)
        ids = prof.experts[prof.is_decode] if prof.is_decode.any() else prof.experts  # [T, L, k]
        keys = (ids.astype(np.int64) + (np.arange(L) * E)[None, :, None]).reshape(-1)
        counts = np.bincount(keys[ids.reshape(-1) >= 0], minlength=L * E)  # [L * E]
        order = np.lexsort((np.arange(L * E), -counts))  # most used first; ties: lower key
        if n_hot == 0:
            raise UserError(f"placement.share={knobs.share} of the expert cache holds no slice of "
                            f"{slice_bytes / 1e6:.1f} MB: give a larger placement.share or a smaller placement.slice")
        self.hot = frozenset(int(k) for k in order[:n_hot])
        self.reserved_bytes = n_hot * slice_bytes
        self.low_bytes = expert_bytes - slice_bytes  # the bottom slice a miss of a hot expert moves

    def place(self, key: int, t: int, weight: float) -> str:
        return LOW if key in self.hot else LOAD

    def dL(self, layer: int, weight: float) -> float:
        return 0.0  # the whole expert runs: nothing is lost
