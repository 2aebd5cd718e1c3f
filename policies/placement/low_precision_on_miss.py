"""`low_precision_on_miss`: load a low-bit copy of a missed expert whose weight is small (HOBBIT).

A missed expert with renormalised weight below `w_max` is loaded as a `low_bits` copy (bytes =
params * low_bits / 8 plus group scales, the preset's group size) into a staging buffer and run
once (it is not cached); others load at full precision. Lossy; dL estimate (ours, documented):
`1/2 * S_l * w^2 * eps`, the Fisher estimate of dropping the expert scaled by the relative mean
squared error `eps` of the low-bit copy; by default eps = 4^-(low_bits - 1) (a uniform quantiser's
error relative to a weight range of about 4 sigma: 0.25 at 2 bits, 0.016 at 4 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.base import LOAD, LOW, Context, PlacementPolicy
from policies.published import sensitivities_or_none
from policies.registry import PLACEMENT
from sim.errors import UserError


class LowCopyPlacement(PlacementPolicy):
    """A placement that loads some missed experts as `low_bits` copies: their bytes and dL estimate
    (the module docstring), from the knobs `low_bits`, `rel_error` and `sensitivity`."""

    def _low_copies(self, knobs, ctx: Context) -> None:
        p = ctx.preset
        if not 0 < knobs.low_bits < p.bits:
            raise UserError(f"placement.low_bits must be in (0, {p.bits}) (the preset's expert bits)")
        self.low_bytes = p.with_overrides(bits=knobs.low_bits).expert_bytes
        self.eps = knobs.rel_error if knobs.rel_error >= 0 else 4.0 ** -(knobs.low_bits - 1)
        self.S = sensitivities_or_none(knobs.sensitivity, ctx)

    def dL(self, layer: int, weight: float) -> float:
        return 0.5 * float(self.S[layer]) * weight * weight * self.eps


@PLACEMENT.register("low_precision_on_miss")
class LowPrecisionOnMiss(LowCopyPlacement):
    reads_weights = True  # decides by the gating weights
    @dataclass
    class Knobs:
        w_max: float = 0.3
        low_bits: float = 2.0
        rel_error: float = -1.0  # eps; -1: 4^-(low_bits - 1)
        sensitivity: str = "trace"  # for dL: trace | published | FILE | none

    def __init__(self, knobs: Knobs, ctx: Context):
        super().__init__(knobs, ctx)
        self._low_copies(knobs, ctx)

    def place(self, key: int, t: int, weight: float) -> str:
        return LOW if weight < self.knobs.w_max else LOAD
